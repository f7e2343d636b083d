"""The one seam between flask-koala and the network.

A :class:`Transport` posts one body and says what came back; it never retries and never
decides anything. Each delivery thread owns one, so connections are kept alive without
being shared across threads. Tests hand in their own through ``Koala(transport_factory=)``,
or point the default one at a loopback receiver.

Exceptions::

    TransportError        no HTTP answer: timeout, refused, reset (always worth a retry)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Callable, Optional, Protocol

import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_environ_proxies

from .config import Timeout

__all__ = ["HTTPTransport", "Response", "Transport", "TransportError", "TransportFactory"]

# What is kept of an answer's body: enough for Koala's {"error": "..."}.
_MAX_TEXT = 2048


@dataclasses.dataclass(frozen=True)
class Response:
    """What Koala answered."""

    status: int
    text: str = ""
    retry_after: Optional[str] = None


class TransportError(Exception):
    """The request got no HTTP answer.

    Attributes:
        reason: ``"timeout"`` or ``"connection_error"``, used as the retry/failure reason.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Transport(Protocol):
    """Posts a body to a URL; one instance is used by one thread at a time."""

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout) -> Response:
        """Send the body; raise :class:`TransportError` when no answer came back."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


TransportFactory = Callable[[], Transport]


class HTTPTransport:
    """Keep-alive HTTP(S) with the stack requests is built on.

    ``requests.Session.post`` spends several times the CPU of the request itself on
    merging settings and hooks that a fixed JSON POST never uses. This drives urllib3's
    connection pool directly, with what requests would have taken from the environment:
    its CA bundle and ``HTTPS_PROXY``/``NO_PROXY``.
    """

    def __init__(self) -> None:
        # One pool manager per URL: an app posts to one endpoint, so this is one entry,
        # and the proxy decision (which reads the environment) is made once.
        self._managers: dict[str, urllib3.PoolManager] = {}

    def _manager(self, url: str) -> urllib3.PoolManager:
        manager = self._managers.get(url)
        if manager is None:
            proxy = get_environ_proxies(url).get(url.split(":", 1)[0])
            if proxy:
                manager = urllib3.ProxyManager(proxy, maxsize=1, ca_certs=DEFAULT_CA_BUNDLE_PATH)
            else:
                manager = urllib3.PoolManager(maxsize=1, ca_certs=DEFAULT_CA_BUNDLE_PATH)
            self._managers[url] = manager
        return manager

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout) -> Response:
        if isinstance(timeout, tuple):
            limits = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        else:
            limits = urllib3.Timeout(connect=timeout, read=timeout)
        try:
            answer = self._manager(url).request(
                "POST",
                url,
                body=body,
                headers=dict(headers),
                timeout=limits,
                retries=False,
                redirect=False,
                preload_content=True,
            )
        except urllib3.exceptions.NewConnectionError as exc:
            # Checked first: urllib3 derives it from ConnectTimeoutError for history's sake.
            raise TransportError("connection_error", type(exc).__name__) from None
        except urllib3.exceptions.TimeoutError as exc:
            raise TransportError("timeout", type(exc).__name__) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransportError("connection_error", type(exc).__name__) from None
        text = answer.data[:_MAX_TEXT].decode("utf-8", "replace")
        return Response(answer.status, text, answer.headers.get("Retry-After"))

    def close(self) -> None:
        for manager in self._managers.values():
            manager.clear()
        self._managers.clear()
