"""Process lifecycle for dispatchers: forks, and a bounded flush at interpreter exit.

Dispatchers register here with :func:`track`. In a forked child each is told to start
afresh (``os.register_at_fork``; the engine also checks its pid, under
:func:`fork_lock`, for servers that fork from C). At exit the engines get one shared,
bounded last chance to deliver; a ``multiprocessing`` child, which skips atexit, gets it
from multiprocessing's own finalizers.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
import weakref
from typing import Protocol

__all__ = ["flush_when_multiprocessing_child_exits", "fork_lock", "track"]


class Forkable(Protocol):
    """Starts afresh in a forked child."""

    def after_fork(self) -> None: ...


class Exiting(Protocol):
    """Gets a bounded last chance to deliver at interpreter exit."""

    shutdown_timeout: float

    @property
    def closed(self) -> bool: ...

    def exit_flush(self, budget: float) -> None: ...


_forkable: weakref.WeakSet[Forkable] = weakref.WeakSet()
_exiting: weakref.WeakSet[Exiting] = weakref.WeakSet()
_fork_lock = threading.Lock()


def track(dispatcher: Forkable, exiting: Exiting | None = None) -> None:
    """Rebuild ``dispatcher`` in forked children; flush ``exiting`` at interpreter exit."""
    _forkable.add(dispatcher)
    if exiting is not None:
        _exiting.add(exiting)


def fork_lock() -> threading.Lock:
    """The lock under which a dispatcher that noticed a fork rebuilds itself."""
    return _fork_lock


def _after_fork_in_child() -> None:
    global _fork_lock
    _fork_lock = threading.Lock()  # a parent thread may have held it at the fork
    for dispatcher in list(_forkable):
        dispatcher.after_fork()


def flush_when_multiprocessing_child_exits() -> None:
    """In a ``multiprocessing`` child, flush at its exit as atexit would elsewhere.

    Such a child ends with ``os._exit()``, which skips atexit; multiprocessing runs its
    own finalizers first. Called when the workers start, since the child's finalizers
    registered before that (at the fork) are cleared by multiprocessing itself.
    """
    # Not imported means not a multiprocessing child (its parent had imported it), and
    # importing it here would cost the first login of every process some milliseconds.
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is None or multiprocessing.parent_process() is None:
        return
    from multiprocessing import util

    util.Finalize(None, _shutdown_at_exit, exitpriority=10)


def _shutdown_at_exit() -> None:
    """Give queued calls a bounded last chance, then let the daemon threads die quietly.

    All engines share one deadline, the longest ``KOALA_SHUTDOWN_TIMEOUT`` among them, so
    several apps in one process do not add up their waits.
    """
    engines = [e for e in list(_exiting) if not e.closed]
    if not engines:
        return
    deadline = time.monotonic() + max(e.shutdown_timeout for e in engines)
    for engine in engines:
        budget = min(engine.shutdown_timeout, max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Exception):  # at exit there is nobody left to tell
            engine.exit_flush(budget)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown_at_exit)
