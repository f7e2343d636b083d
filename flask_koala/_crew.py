"""The engine's delivery threads: how many there are, what each is doing, and their names.

A :class:`Crew` only counts; the engine decides when a worker starts, wakes or leaves, and
holds its lock around every use. Each worker keeps a reference to the crew it was counted
in: when the engine is rebuilt (in a forked child, or once gevent patched threading in after
it was built) it takes a fresh crew, and the old workers, told apart by ``is``, leave on
their own without touching the new count.
"""

from __future__ import annotations

import itertools
import threading

__all__ = ["Crew"]


class Crew:
    """The workers started and not yet left; not thread-safe (the engine's lock guards it)."""

    __slots__ = ("idle", "numbers", "starting", "threads", "workers")

    def __init__(self) -> None:
        self.workers = 0  # threads started and not yet left
        self.starting = 0  # of which not yet looking for work
        self.idle = 0  # of which waiting for work
        self.numbers: set[int] = set()  # the <n> of flask-koala-<n> in use
        self.threads: list[threading.Thread] = []  # for stop() to join

    @property
    def awake(self) -> int:
        """Workers looking for work or delivering."""
        return self.workers - self.idle

    def reserve(self) -> int:
        """Count in one more worker, starting; its number, the lowest free one."""
        number = next(n for n in itertools.count(1) if n not in self.numbers)
        self.numbers.add(number)
        self.workers += 1
        self.starting += 1
        return number

    def started(self, thread: threading.Thread) -> None:
        """Keep the thread of a worker counted in, forgetting those that have ended."""
        self.threads = [t for t in self.threads if t.is_alive()]
        self.threads.append(thread)

    def count_out(self, number: int, *, starting: bool = False) -> None:
        """A worker is leaving, or never got going (``starting``)."""
        self.numbers.discard(number)
        self.workers -= 1
        if starting:
            self.starting -= 1
