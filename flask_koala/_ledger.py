"""Where every call ends: counted, logged at the right level, and signalled.

A call ends in exactly one of *sent*, *failed*, *dropped*, *skipped* (or, with sending
suppressed, *suppressed*). The :class:`Ledger` is the one place that records that end, so
the counters, the log lines and the signals cannot disagree.

Log lines never carry an email, a cookie value or a key; the warnings that can repeat
(drops, failures) are rate-limited so an outage cannot flood the host's logs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any, Callable, Optional

from . import signals
from ._payload import Call, build_body
from ._redact import redact

__all__ = [
    "OUTCOMES",
    "Ledger",
    "describe_error",
    "internal_error",
    "log_unexpected",
]

logger = logging.getLogger("flask_koala")

#: Counters every ledger reports, even at zero, in every mode. ``published`` (Celery mode:
#: handed to the broker) is the end of a call in this process. ``deferred`` is not an end:
#: it counts identifies parked in a session until a ``ko_id`` shows up
#: (``KOALA_MISSING_COOKIE = "defer"``); each later ends as a queued call or a
#: ``skipped.defer_*``.
OUTCOMES = (
    "queued",
    "sent",
    "failed",
    "dropped",
    "skipped",
    "retried",
    "suppressed",
    "published",
    "pending",
    "deferred",
)

#: The counters a call taken for delivery adds one to: ``pending`` until it ends.
_ACCEPTED = ("queued", "pending")

_WARN_INTERVAL = 60.0
# Distinct causes remembered for rate limiting; beyond it, expired ones are forgotten and
# then all of them, so a collector that varies its error text cannot grow memory forever.
_MAX_THROTTLE_KEYS = 256


def describe_error(exc: BaseException) -> str:
    """The exception's type and where it was raised, e.g. ``LookupError at app.py:12 in load``.

    For exceptions raised by the host's code (an identity loader, a signal receiver): their
    message may hold an email or a token, so neither it nor a traceback is logged.
    """
    tb = exc.__traceback__
    if tb is None:
        return type(exc).__name__
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    where = f"{os.path.basename(code.co_filename)}:{tb.tb_lineno} in {code.co_name}"
    return f"{type(exc).__name__} at {where}"


def log_unexpected(exc: BaseException, doing: str, then: str) -> None:
    """Log an error nothing expected, e.g. ``identifying a login``, ``the login goes on``.

    As its type and place only (:func:`describe_error`): the message or a traceback may hold
    an email, a cookie or a key, from the app's objects or flask-koala's own.
    """
    logger.error("flask-koala: %s failed unexpectedly (%s); %s", doing, describe_error(exc), then)


def internal_error(
    ledger: Optional[Ledger], exc: BaseException, doing: str, *, kind: str = "identify"
) -> None:
    """A call the request side was making ended by an error nothing expected: logged as
    :func:`log_unexpected` does, and counted ``skipped.internal_error`` in the app's ledger
    (``None`` when the error came before the app's state was found)."""
    log_unexpected(exc, doing, "the request goes on")
    if ledger is not None:
        ledger.skipped("internal_error", kind=kind)


def _warn_dropped(count: int, reason: str) -> None:
    logger.warning(
        "flask-koala: dropped %d call(s) (%s) since the last report; see koala.stats",
        count,
        reason,
    )


def _warn_failed(count: int, reason: str, status: Optional[int], error: Optional[str]) -> None:
    if status is not None:
        answer = f"Koala answered HTTP {status}: {error or '(no error text)'}"
    else:
        answer = f"no answer from Koala ({error or 'no detail'})"
    logger.warning("flask-koala: %d call(s) failed (%s): %s", count, reason, answer)


class Throttle:
    """Lets one log line per key through per interval and counts the ones it held back."""

    def __init__(self, clock: Callable[[], float], interval: float = _WARN_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._last: dict[object, float] = {}
        self._held: Counter[object] = Counter()

    def allow(self, key: object, count: int = 1) -> Optional[int]:
        """Return how many events this line reports (itself plus held back), or ``None``."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] += count
            return None
        if last is None and len(self._last) >= _MAX_THROTTLE_KEYS:
            self._forget(now)
        self._last[key] = now
        return count + self._held.pop(key, 0)

    def release(self) -> dict[object, int]:
        """Return the events held back per key, and forget them: a last report is due."""
        held, self._held = dict(self._held), Counter()
        return held

    def _forget(self, now: float) -> None:
        expired = [k for k, t in self._last.items() if now - t >= self._interval]
        for k in expired or list(self._last):
            del self._last[k]
            self._held.pop(k, None)


class Ledger:
    """Counts, logs and signals how calls end, for one app.

    Args:
        sender: returns the object signals are sent from (the Flask app), or ``None`` once
            it is gone; the ledger itself never keeps the app alive.
        key: the app's public key, masked in any error text Koala or a socket gives back.
        clock: monotonic clock for rate limiting; tests hand in a fake one.
    """

    def __init__(
        self,
        sender: Callable[[], Optional[object]],
        *,
        key: Optional[str] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sender = sender
        self._key = key
        self._clock = clock
        #: Set at interpreter exit: outcomes are still counted and signalled, but the one
        #: summary line of the exit hook replaces the per-outcome warnings.
        self.quiet = False
        self.reset()

    @property
    def gone(self) -> bool:
        """Whether the app this ledger reports for was collected (its workers may leave)."""
        sender = self._sender
        return isinstance(sender, weakref.ref) and sender() is None

    def reset(self) -> None:
        """Start from zero with fresh locks, as a forked child must."""
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._throttle = Throttle(self._clock)
        self._arrivals: deque[Call] = deque()  # see arrive()

    def snapshot(self) -> MappingProxyType[str, int]:
        """A read-only copy of the counters."""
        with self._lock:
            counts = dict.fromkeys(OUTCOMES, 0)
            counts.update(self._counts)
            arriving = len(self._arrivals)
        for name in _ACCEPTED:
            counts[name] += arriving
        return MappingProxyType(counts)

    # -- how calls end -------------------------------------------------------------------

    def accepted(self, call: Call) -> None:
        """A call was taken for delivery; it is pending until it ends.

        Only counts, so a dispatcher may call it under its own lock; :meth:`announce`
        sends the signal once that lock is released.
        """
        with self._lock:
            self._counts.update(_ACCEPTED)

    def arrive(self, call: Call) -> None:
        """A call was taken for delivery, without a lock: the request thread's way in.

        The call waits here until the dispatcher takes it with :meth:`admit`, and counts as
        queued and pending from now on: the arrivals are the count, kept as the calls
        themselves, because appending to a deque is atomic and a counter's ``+=`` is not.
        """
        self._arrivals.append(call)

    @property
    def arriving(self) -> int:
        """How many calls arrived and were not admitted yet."""
        return len(self._arrivals)

    def admit(self) -> list[Call]:
        """Take every call that arrived, oldest first, and count it as :meth:`accepted`.

        Taken and counted under one lock, so a :meth:`snapshot` sees each call once.
        """
        arrivals = self._arrivals
        if not arrivals:
            return []
        with self._lock:
            calls = [arrivals.popleft() for _ in range(len(arrivals))]
            self._counts.update(dict.fromkeys(_ACCEPTED, len(calls)))
        return calls

    def announce(self, call: Call) -> None:
        """Send ``call_accepted`` with the body the call would be sent as."""
        if signals.call_accepted.receivers:
            self._signal(signals.call_accepted, call, body=build_body([call]))

    def suppressed(self, call: Call) -> None:
        """Sending is suppressed: the call was recorded and goes no further."""
        with self._lock:
            self._counts["suppressed"] += 1
        self.announce(call)
        logger.debug("flask-koala: %s %s recorded, sending suppressed", call.kind, call.message_id)

    def skipped(
        self,
        reason: str,
        *,
        kind: str = "identify",
        email: Optional[str] = None,
        profile_id: Optional[str] = None,
    ) -> None:
        """A call was not made; ``reason`` says why."""
        self._count("skipped", reason, 1)
        logger.debug("flask-koala: %s skipped (%s)", kind, reason)
        sender = self._sender()
        if sender is not None and signals.call_skipped.receivers:
            self._send(
                signals.call_skipped,
                sender,
                message_id=None,
                kind=kind,
                email=email,
                profile_id=profile_id,
                reason=reason,
                status=None,
                error=None,
            )

    def deferred(self, reason: Optional[str] = None) -> None:
        """An identify waits in the visitor's session for a ``ko_id``; not an end yet."""
        self._count("deferred", reason, 1)
        logger.debug("flask-koala: identify deferred until the visitor has a cookie")

    def dropped(self, calls: Sequence[Call], reason: str, *, accepted: bool) -> None:
        """Calls were given up without an attempt: a full queue, shutdown."""
        self._count("dropped", reason, len(calls), pending=len(calls) if accepted else 0)
        with self._lock:
            reported = self._throttle.allow(("dropped", reason), len(calls))
        if reported is not None and not self.quiet:
            _warn_dropped(reported, reason)
        for call in calls:
            self._signal(signals.call_dropped, call, reason=reason)

    def sent(self, calls: Sequence[Call], status: int) -> None:
        """Koala accepted the calls."""
        self._count("sent", None, len(calls), pending=len(calls))
        logger.debug("flask-koala: delivered %d call(s), HTTP %d", len(calls), status)
        for call in calls:
            self._signal(signals.call_sent, call, status=status)

    def failed(
        self,
        calls: Sequence[Call],
        reason: str,
        *,
        status: Optional[int] = None,
        error: Optional[str] = None,
    ) -> None:
        """The calls will not be delivered; one WARNING per distinct cause per minute."""
        error = redact(error, key=self._key) if error else None
        self._count("failed", reason, len(calls), pending=len(calls))
        self.warn_failed(len(calls), reason, status=status, error=error)
        for call in calls:
            self._signal(signals.call_failed, call, reason=reason, status=status, error=error)

    def warn_failed(
        self, count: int, reason: str, *, status: Optional[int], error: Optional[str]
    ) -> None:
        """The WARNING for failed calls, at most once per distinct cause per minute.

        Separate from :meth:`failed` so a Celery worker, which has message ids but no
        calls and no app, reports failures in the same words.
        """
        with self._lock:
            reported = self._throttle.allow(("failed", reason, status, error), count)
        if reported is not None and not self.quiet:
            _warn_failed(reported, reason, status, error)

    def report_held(self) -> None:
        """Log the drops and failures the once-a-minute WARNINGs held back (at shutdown and
        exit): the burst held back may have been the last, and no later line would say so."""
        with self._lock:
            held = self._throttle.release()
        if self.quiet:
            return
        for key, count in held.items():
            if isinstance(key, tuple) and key[0] == "dropped":
                _warn_dropped(count, key[1])
            elif isinstance(key, tuple) and key[0] == "failed":
                _warn_failed(count, *key[1:])

    def published(self, calls: Sequence[Call]) -> None:
        """The calls left this process for a Celery worker, which records how they end."""
        self._count("published", None, len(calls), pending=len(calls))
        logger.debug("flask-koala: handed %d call(s) to the Celery broker", len(calls))

    def retried(self, calls: Sequence[Call], reason: str, wait: float) -> None:
        """The calls will be tried again after ``wait`` seconds."""
        self._count("retried", reason, len(calls))
        logger.debug("flask-koala: retrying %d call(s) in %.2fs (%s)", len(calls), wait, reason)

    # -- plumbing ------------------------------------------------------------------------

    def _count(self, outcome: str, reason: Optional[str], n: int, *, pending: int = 0) -> None:
        with self._lock:
            self._counts[outcome] += n
            if reason is not None:
                self._counts[f"{outcome}.{reason}"] += n
            if pending:
                self._counts["pending"] -= pending

    def _signal(self, signal: Any, call: Call, **extra: Any) -> None:
        if not signal.receivers:
            return
        sender = self._sender()
        if sender is None:
            return
        kwargs: dict[str, Any] = {
            "message_id": call.message_id,
            "kind": call.kind,
            "email": call.email,
            "profile_id": call.profile_id,
            "reason": None,
            "status": None,
            "error": None,
        }
        kwargs.update(extra)
        self._send(signal, sender, **kwargs)

    @staticmethod
    def _send(signal: Any, sender: object, **kwargs: Any) -> None:
        try:
            signal.send(sender, **kwargs)
        except Exception as exc:
            # The host's code: its message may quote the email it was handed.
            logger.error(
                "flask-koala: a receiver of the %s signal raised %s",
                signal.name,
                describe_error(exc),
            )
