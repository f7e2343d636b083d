"""Delivering a batch over HTTP: the engine's handler for Koala's ingest API.

:class:`HTTPHandler` opens one :class:`HTTPChannel` (one keep-alive transport) per worker;
a channel posts a batch once and classifies the answer into a
:class:`~flask_koala._engine.Verdict` by the policy of ``koala-api.md``: any 2xx is sent;
408, 429, 5xx, timeouts and connection errors are worth a retry; any other 4xx is final.
Retries, pauses and counting are the engine's; threads and Flask live elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from ._config import Timeout
from ._engine import Verdict
from ._payload import Call, build_body, encode_body
from ._queue import Batch
from ._retry import is_retryable, parse_retry_after
from ._transport import Response, Transport, TransportError, TransportFactory
from ._version import __version__

__all__ = [
    "USER_AGENT",
    "HTTPChannel",
    "HTTPHandler",
    "attempt",
    "classify",
    "error_text",
    "headers",
]

USER_AGENT = f"flask-koala/{__version__}"

# JSON, and a User-Agent so Koala does not take us for a bot; one mapping for every post.
_HEADERS: Mapping[str, str] = MappingProxyType(
    {"Content-Type": "application/json", "User-Agent": USER_AGENT}
)


def headers() -> dict[str, str]:
    """The headers of every call: JSON, and a User-Agent so Koala does not take us for a bot."""
    return dict(_HEADERS)


def error_text(response: Response) -> str:
    """Koala's error text from an answer: ``{"error": "..."}``, else the start of the body."""
    try:
        data = json.loads(response.text)
    except ValueError:
        return response.text.strip()[:200]
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return response.text.strip()[:200]


def classify(response: Response) -> Verdict:
    """The verdict on an HTTP answer."""
    status = response.status
    if 200 <= status <= 299:
        return Verdict("sent", status=status)
    reason = f"http_{status}"
    if is_retryable(status):
        return Verdict(
            "retry",
            reason,
            status,
            error_text(response),
            parse_retry_after(response.retry_after),
        )
    return Verdict("failed", reason, status, error_text(response))


def attempt(transport: Transport, url: str, body: bytes, timeout: Timeout) -> Verdict:
    """Post once and classify the answer; no answer at all is worth a retry."""
    try:
        response = transport.post(url, body, _HEADERS, timeout)
    except TransportError as exc:
        # A setting of the environment that cannot work (a socks proxy, a missing CA bundle)
        # fails at once; anything else without an answer is worth a retry.
        return Verdict("retry" if exc.retryable else "failed", exc.reason, error=exc.detail)
    return classify(response)


class HTTPHandler:
    """Posts batches to Koala; one transport per worker.

    Args:
        routes: the URL of each route a call can have (:attr:`~flask_koala._payload.Call.route`).
        timeout: per attempt, as ``KOALA_TIMEOUT``.
        transport_factory: makes one transport (one keep-alive connection) per channel.
    """

    def __init__(
        self,
        routes: Mapping[str, str],
        *,
        timeout: Timeout,
        transport_factory: TransportFactory,
    ) -> None:
        self.routes = dict(routes)
        self.timeout = timeout
        self.transport_factory = transport_factory

    def open(self) -> HTTPChannel:
        """A channel with a transport of its own."""
        return HTTPChannel(self, self.transport_factory())


class HTTPChannel:
    """One worker's transport; posts each batch once."""

    def __init__(self, handler: HTTPHandler, transport: Transport) -> None:
        self._routes = handler.routes
        self._timeout = handler.timeout
        self.transport = transport

    def handle(self, batch: Sequence[Call]) -> Verdict:
        """One attempt at the batch; the encoded body is kept for its retries."""
        memo = batch.memo if isinstance(batch, Batch) else None
        if isinstance(memo, bytes):
            body = memo
        else:
            body = encode_body(build_body(batch))
            if isinstance(batch, Batch):
                batch.memo = body
        return attempt(self.transport, self._routes[batch[0].route], body, self._timeout)

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        """Cut the attempt in flight short, where the transport can (``abort()``)."""
        abort = getattr(self.transport, "abort", None)
        if abort is not None:
            abort()
