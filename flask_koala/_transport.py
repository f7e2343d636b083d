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
import http.client
import io
import socket
import ssl
import time
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Optional, Protocol, cast
from urllib.parse import urlsplit

import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_environ_proxies
from urllib3.util import wait_for_read

from ._config import Timeout

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
    """Keep-alive HTTP(S) for one thread: one connection, reused from call to call.

    ``requests.Session.post`` spends several times the CPU of the request itself on
    merging settings and hooks that a fixed JSON POST never uses, and urllib3's pool
    manager still doubles the cost of a bare ``http.client`` POST. A worker posts small
    bodies to one URL, so ``http.client`` does it, with what requests would have taken
    from the environment: its CA bundle, and ``HTTPS_PROXY``/``NO_PROXY`` (a URL that
    goes through a proxy is sent with urllib3's proxy support instead).
    """

    def __init__(self) -> None:
        self._url = ""
        self._path = ""
        self._connection: Optional[http.client.HTTPConnection] = None
        self._proxy: Optional[urllib3.ProxyManager] = None
        self._finalizer: Optional[weakref.finalize[[], HTTPTransport]] = None
        self._deadline = 0.0  # when the attempt in flight must have its whole answer

    def _target(self, url: str) -> None:
        """Aim at ``url``: decide on the proxy (it reads the environment) once per URL."""
        self.close()
        self._url = url
        proxy = get_environ_proxies(url).get(url.split(":", 1)[0])
        if proxy:
            self._proxy = urllib3.ProxyManager(proxy, maxsize=1, ca_certs=DEFAULT_CA_BUNDLE_PATH)
            return
        parts = urlsplit(url)
        self._path = parts.path or "/"
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=DEFAULT_CA_BUNDLE_PATH)
            self._connection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, context=context
            )
        else:
            self._connection = http.client.HTTPConnection(parts.hostname or "", parts.port)
        self._connection.response_class = self._response  # type: ignore[assignment]
        # A transport dropped without close() (a sync app never shut down) must not leak
        # its socket, as urllib3's pools do not.
        self._finalizer = weakref.finalize(self, self._connection.close)
        # Not at exit: finalizers run before the exit flush, and would cut the connection
        # under a worker still delivering; the process closes the socket anyway.
        self._finalizer.atexit = False

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout) -> Response:
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        if url != self._url:
            self._target(url)
        connection = self._connection
        if connection is None:
            return self._post_via_proxy(url, body, headers, connect, read)
        # A per-read timeout alone lets a server that trickles its answer hold a worker
        # (and a flush) forever: the whole attempt gets connect + read seconds.
        self._deadline = time.monotonic() + connect + read
        try:
            if connection.sock is not None and _dropped(connection.sock):
                connection.close()  # the server hung up while it was idle
            if connection.sock is None:
                connection.timeout = connect
                connection.connect()
            cast(socket.socket, connection.sock).settimeout(read)
            # Body as bytes: http.client sends it in the same write as the headers.
            connection.request("POST", self._path, body, dict(headers))
            answer = connection.getresponse()
            data = answer.read(_MAX_TEXT)
        except socket.timeout as exc:  # TimeoutError from Python 3.10
            connection.close()
            raise TransportError("timeout", type(exc).__name__) from None
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise TransportError("connection_error", type(exc).__name__) from None
        if answer.will_close or not answer.isclosed():
            connection.close()  # the server said so, or left more body than we read
        text = data[:_MAX_TEXT].decode("utf-8", "replace")
        return Response(answer.status, text, answer.getheader("Retry-After"))

    def _response(self, sock: socket.socket, *args: Any, **kwargs: Any) -> http.client.HTTPResponse:
        """http.client's response, reading through the attempt's deadline."""
        return http.client.HTTPResponse(_DeadlineSocket(sock, self._deadline), *args, **kwargs)  # type: ignore[arg-type]

    def _post_via_proxy(
        self, url: str, body: bytes, headers: Mapping[str, str], connect: float, read: float
    ) -> Response:
        assert self._proxy is not None
        try:
            answer = self._proxy.request(
                "POST",
                url,
                body=body,
                headers=dict(headers),
                timeout=urllib3.Timeout(connect=connect, read=read),
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
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._connection is not None:
            self._connection.close()
        if self._proxy is not None:
            self._proxy.clear()
        self._url = ""
        self._connection = self._proxy = None


class _DeadlineSocket:
    """What ``HTTPResponse`` needs of a socket (``makefile``), reads bounded by a deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _DeadlineReader(io.RawIOBase):
    """Each read waits at most until the deadline; the socket stays open on close."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("the answer took longer than KOALA_TIMEOUT allows")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


def _dropped(sock: socket.socket) -> bool:
    """Whether an idle keep-alive connection was closed (or sent something) by the server."""
    try:
        return bool(wait_for_read(sock, timeout=0.0))
    except OSError:
        return True
