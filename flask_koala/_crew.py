"""The engine's delivery threads: how many there are, what each is doing, and their names.

A :class:`Crew` only counts; the engine decides when a worker starts, wakes or leaves, and
holds its lock around every use. Each worker keeps a reference to the crew it was counted
in: when the engine is rebuilt (in a forked child, or once gevent patched threading in after
it was built) it takes a fresh crew, and the old workers, told apart by ``is``, leave on
their own without touching the new count.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterable

__all__ = ["Crew", "cut_short"]


class Crew:
    """The workers started and not yet left; not thread-safe (the engine's lock guards it)."""

    __slots__ = ("channels", "idle", "numbers", "starting", "threads", "workers")

    def __init__(self) -> None:
        self.workers = 0  # threads started and not yet left
        self.starting = 0  # of which not yet looking for work
        self.idle = 0  # of which waiting for work
        self.numbers: set[int] = set()  # the <n> of flask-koala-<n> in use
        self.threads: list[threading.Thread] = []  # for stop() to join
        self.channels: dict[int, object] = {}  # each worker's open channel, by id()

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


def cut_short(
    channels: Iterable[object], threads: Iterable[threading.Thread], grace: float
) -> None:
    """Workers outlived ``stop()``'s wait: end their attempts in flight, then wait up to
    ``grace`` seconds for them to leave. A channel without ``abort()`` ends when its
    attempt does (its own deadline). Called without the engine's lock."""
    me = threading.current_thread()
    alive = [t for t in threads if t is not me and t.is_alive()]
    if not alive:
        return
    for channel in channels:
        abort = getattr(channel, "abort", None)
        if abort is not None:
            with contextlib.suppress(Exception):  # a custom transport's: never into stop()
                abort()
    end = time.monotonic() + grace
    for thread in alive:
        thread.join(max(0.0, end - time.monotonic()))
