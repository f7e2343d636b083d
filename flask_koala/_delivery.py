"""Sending one batch to Koala until it is delivered or has finally failed.

:class:`Delivery` applies the retry policy around a :class:`~flask_koala._transport.Transport`
and reports the end to the :class:`~flask_koala._ledger.Ledger`. Threads, queues and Flask
live elsewhere; this is the part every way of sending shares.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import Callable, Optional

from ._config import Timeout
from ._ledger import Ledger
from ._payload import Call, build_body, encode_body
from ._retry import RetryPolicy, is_retryable, parse_retry_after
from ._transport import Response, Transport, TransportError
from ._version import __version__

__all__ = ["USER_AGENT", "Delivery", "Outcome", "PauseGate", "attempt", "error_text", "headers"]

USER_AGENT = f"flask-koala/{__version__}"


def headers() -> dict[str, str]:
    """The headers of every call: JSON, and a User-Agent so Koala does not take us for a bot."""
    return {"Content-Type": "application/json", "User-Agent": USER_AGENT}


def error_text(response: Response) -> str:
    """Koala's error text from an answer: ``{"error": "..."}``, else the start of the body."""
    try:
        data = json.loads(response.text)
    except ValueError:
        return response.text.strip()[:200]
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return response.text.strip()[:200]


class Outcome:
    """What one attempt came to: delivered, retry (after ``wait``), or final failure."""

    __slots__ = ("delivered", "error", "reason", "retry", "retry_after", "status")

    def __init__(
        self,
        *,
        delivered: bool = False,
        retry: bool = False,
        reason: Optional[str] = None,
        status: Optional[int] = None,
        error: Optional[str] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        self.delivered = delivered
        self.retry = retry
        self.reason = reason
        self.status = status
        self.error = error
        self.retry_after = retry_after


def attempt(transport: Transport, url: str, body: bytes, timeout: Timeout) -> Outcome:
    """Post once and classify the answer by the policy of ``koala-api.md``."""
    try:
        response = transport.post(url, body, headers(), timeout)
    except TransportError as exc:
        return Outcome(retry=exc.retryable, reason=exc.reason, error=exc.detail)
    status = response.status
    if 200 <= status <= 299:
        return Outcome(delivered=True, status=status)
    reason = f"http_{status}"
    if is_retryable(status):
        return Outcome(
            retry=True,
            reason=reason,
            status=status,
            error=error_text(response),
            retry_after=parse_retry_after(response.retry_after),
        )
    return Outcome(reason=reason, status=status, error=error_text(response))


class PauseGate:
    """A ``Retry-After`` seen by one worker pauses every worker of the app."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until = 0.0

    def pause(self, seconds: float) -> None:
        """Hold every attempt back for ``seconds`` from now (never shortens a pause)."""
        self._until = max(self._until, self._clock() + seconds)

    def remaining(self) -> float:
        """Seconds left in the current pause, 0 when open."""
        return max(0.0, self._until - self._clock())


class Delivery:
    """Delivers batches to one endpoint with retries; reports how each ended.

    Args:
        endpoint: the batch URL.
        timeout: per attempt, as ``KOALA_TIMEOUT``.
        policy: retries and backoff.
        ledger: where outcomes are recorded.
        stop: when set, waits end at once and a call mid-retry fails with reason
            ``shutdown`` instead of waiting on.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: Timeout,
        policy: RetryPolicy,
        ledger: Ledger,
        stop: Optional[threading.Event] = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.policy = policy
        self.ledger = ledger
        self.gate = PauseGate()
        self.stop = stop if stop is not None else threading.Event()

    def send(self, calls: Sequence[Call], transport: Transport) -> bool:
        """Deliver one batch (calls about one person); ``True`` when Koala took it."""
        body = encode_body(build_body(calls))
        retry = 0
        if not self._wait_for_gate():
            self.ledger.dropped(calls, "shutdown", accepted=True)
            return False
        while True:
            outcome = attempt(transport, self.endpoint, body, self.timeout)
            if outcome.delivered:
                self.ledger.sent(calls, outcome.status or 200)
                return True
            if not outcome.retry:
                self.ledger.failed(
                    calls, outcome.reason or "error", status=outcome.status, error=outcome.error
                )
                return False
            if retry >= self.policy.attempts:
                self.ledger.failed(
                    calls,
                    "retries_exhausted",
                    status=outcome.status,
                    error=f"{outcome.reason}: {outcome.error or ''}".rstrip(": "),
                )
                return False
            if outcome.retry_after is not None:
                wait = outcome.retry_after
                self.gate.pause(wait)
            else:
                wait = self.policy.backoff(retry)
            self.ledger.retried(calls, outcome.reason or "error", wait)
            retry += 1
            # The gate is read again after the wait: another worker may have seen a
            # Retry-After while this one was backing off.
            if not self._wait(wait) or not self._wait_for_gate():
                self.ledger.failed(calls, "shutdown", error="shut down while waiting to retry")
                return False

    def _wait_for_gate(self) -> bool:
        """Wait out a ``Retry-After`` pause, however often it is extended; ``False`` on stop."""
        remaining = self.gate.remaining()
        while remaining > 0:
            if not self._wait(remaining):
                return False
            remaining = self.gate.remaining()
        return not self.stop.is_set()

    def _wait(self, seconds: float) -> bool:
        """Sleep unless stopping; ``False`` when the stop came first."""
        if self.stop.is_set():
            return False
        if seconds > 0:
            return not self.stop.wait(seconds)
        return True
