"""The seam between the engine and what delivers: handlers, channels and verdicts.

A :class:`Handler` (HTTP in ``_delivery``, a task publisher in ``flask_koala.celery``) opens
one :class:`Channel` per worker; a channel makes one attempt at a batch and says how it went
in a :class:`Verdict`. :func:`conclude` turns a verdict into ledger entries and, for a retry,
the wait before the next try: the one place that decision is made, for the thread engine
and for synchronous sending alike. ``flask_koala._engine`` re-exports the three types.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple, Optional, Protocol

from ._ledger import Ledger
from ._payload import Call
from ._queue import Batch
from ._retry import RetryPolicy

__all__ = ["Channel", "Handler", "Verdict", "close_quietly", "conclude"]

logger = logging.getLogger("flask_koala")


class Verdict(NamedTuple):
    """How one attempt at one batch ended; the engine turns it into ledger calls and retries."""

    outcome: str  # "sent" | "published" | "retry" | "failed" | "dropped"
    reason: str = ""  # e.g. "http_503", "timeout", "connection_error", "broker_error"
    status: Optional[int] = None  # HTTP status, when there was one
    error: Optional[str] = None  # the collector's error text (the ledger redacts it)
    retry_after: Optional[float] = None  # seconds, from Retry-After; pauses the whole app


class Channel(Protocol):
    """One worker's connection (an HTTP keep-alive socket, a broker producer).

    A channel may also have ``handle_many(batches) -> list[Verdict]``, one verdict per
    batch, in order: the engine then hands it the batches waiting together (at most 32),
    as Celery mode's Redis list publishes them in one round trip. And it may have
    ``abort()``, called from another thread when ``shutdown(timeout)`` has waited long
    enough: the attempt in flight then ends at once, as a connection error.
    """

    def handle(self, batch: Sequence[Call]) -> Verdict:
        """One attempt; never raises on network or broker errors."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


class Handler(Protocol):
    """Delivers batches for one app; knows nothing of threads, queues or retries."""

    def open(self) -> Channel:
        """A channel for one worker; called on that worker's thread."""
        ...


def conclude(
    ledger: Ledger, policy: RetryPolicy, batch: Batch, verdict: Verdict
) -> Optional[float]:
    """Record how an attempt went; return the wait before the next try, ``None`` once ended."""
    outcome, reason = verdict.outcome, verdict.reason or "error"
    if outcome == "sent":
        ledger.sent(batch, verdict.status or 200)
    elif outcome == "published":
        ledger.published(batch)
    elif outcome == "dropped":
        ledger.dropped(batch, reason, accepted=True)
    elif outcome == "retry" and batch.attempts < policy.attempts:
        wait = verdict.retry_after
        if wait is None:
            wait = policy.backoff(batch.attempts - 1)
        ledger.retried(batch, reason, wait)
        return wait
    elif outcome == "retry":
        error = f"{reason}: {verdict.error or ''}".rstrip(": ")
        ledger.failed(batch, "retries_exhausted", status=verdict.status, error=error)
    else:
        ledger.failed(batch, reason, status=verdict.status, error=verdict.error)
    return None


def close_quietly(channel: Channel) -> None:
    """Close a channel that is done with; a failure to close is only worth a DEBUG line."""
    try:
        channel.close()
    except Exception:
        logger.debug("flask-koala: closing a channel failed", exc_info=True)
