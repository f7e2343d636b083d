"""When to try a call again, and how long to wait first.

The policy of ``koala-api.md``: any 2xx is delivered; 408, 429, 5xx, timeouts and
connection errors are retried with capped exponential backoff and full jitter, or after
``Retry-After`` when Koala sends one; every other status is final. Plain Python, shared by
the thread engine, synchronous sending and the Celery task. ``RetryPolicy.attempts``
counts the first try, as stamina's does; the ``KOALA_MAX_RETRIES`` setting counts retries.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Callable, Optional

__all__ = ["RETRY_AFTER_MAX", "PauseGate", "RetryPolicy", "is_retryable", "parse_retry_after"]

#: The longest ``Retry-After`` honoured, in seconds; a larger one is clamped to this.
RETRY_AFTER_MAX = 60.0


def is_retryable(status: int) -> bool:
    """408, 429 and 5xx are worth another try; any other non-2xx answer is final."""
    return status in (408, 429) or 500 <= status <= 599


def parse_retry_after(
    value: Optional[str],
    *,
    now: Callable[[], float] = time.time,
    maximum: float = RETRY_AFTER_MAX,
) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), clamped.

    Returns ``None`` when there is no usable header, so the caller falls back to backoff.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - now()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), maximum)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How many tries, and the backoff between them (stamina's vocabulary).

    Attributes:
        attempts: tries in all, the first one included (``KOALA_MAX_RETRIES + 1``).
        wait_initial: the backoff cap of the first retry, in seconds.
        wait_max: no backoff is ever longer than this.
        wait_exp_base: each retry doubles (by default) the cap of the one before.
    """

    attempts: int = 7
    wait_initial: float = 0.5
    wait_max: float = 30.0
    wait_exp_base: float = 2.0
    rng: Callable[[], float] = dataclasses.field(default=random.random, compare=False)

    def backoff(self, retry: int) -> float:
        """Full jitter: a uniform wait between 0 and the capped exponential for ``retry``.

        ``retry`` counts from 0 for the first retry.
        """
        cap = min(self.wait_max, self.wait_initial * self.wait_exp_base**retry)
        return cap * self.rng()

    @classmethod
    def from_retries(cls, retries: int) -> RetryPolicy:
        """The policy for a number of retries, as ``KOALA_MAX_RETRIES`` gives it."""
        return cls(attempts=retries + 1)


class PauseGate:
    """A ``Retry-After`` seen by one worker pauses every worker of the app.

    The read-modify-write of the deadline is under a lock: two workers seeing different
    ``Retry-After`` values at once keep the longer pause, never the one written last.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._until = -math.inf

    def pause(self, seconds: float) -> None:
        """Hold every attempt back for ``seconds`` from now (never shortens a pause)."""
        with self._lock:
            until = self._clock() + seconds
            if until > self._until:
                self._until = until

    def remaining(self) -> float:
        """Seconds left in the current pause, 0 when open."""
        until = self._until
        if until == -math.inf:
            return 0.0
        return max(0.0, until - self._clock())
