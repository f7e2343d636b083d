"""The calls an engine has admitted and not yet ended, and what each ``flush()`` waits for.

The engine's queue and timer heap hold most of them; this holds the count of them all and
the batches between a worker taking them and their outcome being recorded.

A flush waits for the calls unfinished when it began, not for "nothing pending": while
logins keep arriving, nothing pending may never come. It notes its calls by identity (a
call is one object from admission to its end) and every call is struck off as it ends;
calls admitted after it began are left to the next flush.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Sequence
from typing import Callable, Optional

from ._payload import Call
from ._queue import Batch

__all__ = ["Unfinished"]

_LIVENESS_CHECK = 0.25  # how often a flush without timeout checks that workers still live


class Unfinished:
    """Counts the engine's unfinished calls; not thread-safe (the engine's lock guards it)."""

    def __init__(self) -> None:
        self.count = 0  # calls queued, waiting to retry or being delivered
        self._taken: dict[int, Batch] = {}  # in a worker's hands
        self._answered: dict[int, Batch] = {}  # their outcome being recorded
        self._flushes: list[set[int]] = []  # per waiting flush, the ids of its calls left

    def taken(self, batch: Batch) -> None:
        """A worker took ``batch`` to attempt it."""
        self._taken[id(batch)] = batch

    def answered(self, batch: Batch) -> bool:
        """The attempt at ``batch`` is over; ``False`` when :meth:`claim` took it first."""
        if self._taken.pop(id(batch), None) is None:
            return False
        self._answered[id(batch)] = batch
        return True

    def retrying(self, batch: Batch) -> None:
        """``batch`` goes back on the timer heap: answered, not ended."""
        del self._answered[id(batch)]

    def settled(self, batch: Batch) -> bool:
        """``batch`` has ended; ``True`` when a waiting flush should look again."""
        del self._answered[id(batch)]
        return self.ended(batch)

    def ended(self, calls: Sequence[Call]) -> bool:
        """Calls have ended (outside a worker's hands too); ``True`` as for :meth:`settled`."""
        self.count -= len(calls)
        done = self.count <= 0
        if self._flushes:  # only while someone flushes
            ids = [id(call) for call in calls]
            for left in self._flushes:
                if left:
                    left.difference_update(ids)
                    done = done or not left
        return done

    def claim(self) -> list[Call]:
        """At exit: end and return the calls still in a worker's hands."""
        claimed = [call for batch in self._taken.values() for call in batch]
        self._taken.clear()
        self.ended(claimed)
        return claimed

    def flush(
        self,
        elsewhere: Iterable[Call],
        done: threading.Condition,
        working: Callable[[], bool],
        deadline: Optional[float],
        clock: Callable[[], float],
    ) -> bool:
        """Wait on ``done`` until the calls unfinished now (``elsewhere``: the queue's and
        the timers'; and the ones in hand) have ended; ``False`` once ``deadline`` passes or
        nobody is ``working`` on them. Called, and returns, with ``done``'s lock held."""
        in_hand = itertools.chain(*self._taken.values(), *self._answered.values())
        left = {id(call) for call in itertools.chain(elsewhere, in_hand)}
        self._flushes.append(left)
        try:
            while left:
                if not working():
                    return False  # never started, or gone: nothing will end what is left
                wait = _LIVENESS_CHECK
                if deadline is not None:
                    wait = min(wait, deadline - clock())
                    if wait <= 0:
                        return False
                done.wait(wait)
            return True
        finally:
            self._flushes = [other for other in self._flushes if other is not left]
