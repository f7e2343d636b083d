"""How many delivery threads a backlog needs awake: the engine's one waking rule.

A login queues its call and wakes the workers once its response has gone out. Waking a
worker per login, or starting one per waiting call, costs more than the call itself: every
thread that wakes takes the GIL from the request threads, and workers sending side by side
take it from each other. So one worker is roused at a time, and it drains what waits.
Another is woken (or started, up to ``KOALA_MAX_WORKERS``) only when the awake ones fall
behind: :data:`BURST` calls or more waiting for each of them, or the oldest waiting call
older than :data:`HELP_AFTER` (a slow Koala: one worker sends one call per round trip).

A worker roused by a response that has just closed first sleeps :data:`SETTLE`, with the
GIL released, so the server thread can finish that request and the next few logins can
queue behind the first: one worker then sends them back to back instead of waking for
each (``benchmarks/``, figures 1b and 2b, measured it).
"""

from __future__ import annotations

import math
import time
from typing import Optional

__all__ = ["BURST", "HELP_AFTER", "SETTLE", "WAKE_POLL", "behind", "idle_wait"]

#: How long a worker roused by a closed response leaves the GIL to the request threads.
SETTLE = 0.02
#: A call waiting this long (seconds) means the awake workers need help.
HELP_AFTER = 0.1
#: So does this many calls waiting for each awake worker.
BURST = 32
#: A worker waits at most this long at a time: a request that queued calls may never wake it
#: (a server that never closes the response), and an idle worker checks its app still lives.
WAKE_POLL = 1.0


def behind(waiting: int, awake: int, oldest: Optional[float]) -> bool:
    """Whether ``awake`` workers need another for ``waiting`` calls.

    ``oldest`` is when the oldest waiting call was made (``time.time()``), if known.
    With no worker awake, any call waiting needs one.
    """
    if waiting <= 0:
        return False
    if awake <= 0 or waiting >= BURST * awake:
        return True
    return oldest is not None and time.time() - oldest >= HELP_AFTER


def idle_wait(
    idle_for: float,
    until_timer: Optional[float],
    *,
    queued: bool,
    idle_timeout: float,
    app_gone: bool,
    keeps_time: bool,
) -> Optional[float]:
    """How long a worker with nothing to take waits; ``None`` when it should leave.

    Args:
        idle_for: seconds since it last had work.
        until_timer: seconds until the next retry is due, if one waits.
        queued: calls are queued by a request that has not woken the workers yet.
        idle_timeout: an unoccupied worker leaves after this long.
        app_gone: the app was collected; nothing more will come.
        keeps_time: it is the last worker and a retry waits: it stays for it.
    """
    timeout = math.inf if until_timer is None else max(0.0, until_timer)
    if queued:
        return min(timeout, WAKE_POLL)
    if idle_for >= idle_timeout or app_gone:
        # Done idling: leave, unless a retry needs this last worker to wait for it.
        return None if not keeps_time else min(timeout, WAKE_POLL)
    return min(timeout, WAKE_POLL, idle_timeout - idle_for)
