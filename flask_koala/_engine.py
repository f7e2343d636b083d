"""The thread engine: queueing, waking, workers, retry scheduling, pauses, forks and exit.

The engine knows nothing of HTTP or Celery. A :class:`Handler` opens one :class:`Channel`
per worker thread; a channel makes one attempt at one batch and says how it went in a
:class:`Verdict`. Everything else happens here:

- a bounded queue of batches about one person and route (``_queue``); a request thread
  takes no lock to add to it: its calls arrive in the ledger, and are admitted into the
  queue at the next wake-up or take;
- the workers (a ``_crew``) and waking: a request queues with ``wake=False`` and rouses a
  worker once its response has gone out; more only when the awake ones fall behind
  (``_waking``), up to ``max_workers``;
- retries on a timer heap: a batch waiting for its retry holds no worker, so a partial
  outage cannot stall calls that would go through;
- ``Retry-After`` as an app-wide pause (``_retry.PauseGate``);
- idle workers leave after ``idle_timeout`` (and their app's engine can then be collected);
- forks and exit (with ``_lifecycle``), and threading monkey-patched in after the engine
  was built (gevent ``--preload``).

Nothing that can block or call user code (signals, logging, thread starts) runs while the
engine's lock is held: under gevent a greenlet that yields there would deadlock the process.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections import deque
from typing import Callable, Optional

from ._crew import Crew, cut_short
from ._handlers import Channel, Handler, Verdict, close_quietly, conclude
from ._ledger import Ledger, log_unexpected
from ._lifecycle import flush_when_multiprocessing_child_exits, fork_lock, track
from ._payload import Call
from ._queue import Batch, PersonQueue
from ._retry import PauseGate, RetryPolicy
from ._unfinished import Unfinished
from ._waking import SETTLE, behind, idle_wait

# The seam's types are defined in _handlers and re-exported: handlers import them from here.
__all__ = ["IDLE_TIMEOUT", "Channel", "Engine", "Handler", "Verdict", "conclude"]

logger = logging.getLogger("flask_koala")

#: How long a worker with nothing to do waits before it leaves (it starts again on demand).
IDLE_TIMEOUT = 5.0

_THREAD_PREFIX = "flask-koala"
_JOIN_GRACE = 0.2  # shutdown(timeout)'s wait, beyond it, for workers to leave (a daemon)
_CUT_GRACE = 1.0  # then, their attempts cut short, the wait for them to leave
_EXIT_JOIN = 0.2  # at exit daemon threads die with the process; only wait to close sockets
_INTERNAL_ERROR = Verdict("failed", "internal_error")
_MANY = 32  # batches at most to a channel with handle_many at once (one Redis round trip)


class Engine:
    """A bounded in-memory queue drained by daemon threads named ``flask-koala-<n>``.

    It is the thread-mode dispatcher itself (``submit``/``wake``/``flush``/``shutdown``/
    ``pending``), and the Celery dispatcher runs one with a publishing handler.

    Args:
        handler: opens one channel per worker, which makes the attempts.
        ledger: where every outcome is recorded.
        policy: retries and backoff; ``attempts`` counts the first try.
        max_workers: at most this many threads, started as the backlog needs them.
        max_queue_size: calls held beyond this (queued, in flight, retrying) are dropped.
        shutdown_timeout: how long the exit hook flushes before it gives up.
        idle_timeout: a worker with nothing to do for this long leaves.
        settle: seconds a worker woken by a closed response first leaves the GIL (0: none).
        clock: monotonic clock for retries and pauses.
    """

    def __init__(
        self,
        handler: Handler,
        ledger: Ledger,
        *,
        policy: RetryPolicy,
        max_workers: int = 4,
        max_queue_size: int = 10_000,
        shutdown_timeout: float = 2.0,
        idle_timeout: float = IDLE_TIMEOUT,
        settle: float = SETTLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handler = handler
        self._ledger = ledger
        self.policy = policy
        self.max_workers = max(1, max_workers)
        self.max_queue_size = max_queue_size
        self.shutdown_timeout = shutdown_timeout
        self._idle_timeout = idle_timeout
        self._settle_for = settle
        self._clock = clock
        self._closed = False
        self._reset()
        track(self, self)

    def _reset(self) -> None:
        """Fresh queue, locks and no threads: at construction and in a forked child."""
        self._primitives()
        self._queue = PersonQueue()
        self._ready: deque[Batch] = deque()  # retries that are due, before new calls
        self._timers: list[tuple[float, int, Batch]] = []  # retries waiting, a heap
        self._seq = itertools.count()
        self._unfinished = Unfinished()
        self._released = False  # may workers take what is queued (wake=False holds it)
        self._closes_seen = False  # has a wake() followed a response (see submit)
        self._settle_next = False  # did the last wake-up follow a response (see _take)
        self._crew = Crew()  # the workers; each keeps its own, so a new one ends theirs
        self._stopping = False
        self._exit_hooked = False
        self._gate = PauseGate(self._clock)
        self._pid = os.getpid()

    def _primitives(self) -> None:
        self._lock_type = threading.Lock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait here
        self._done = threading.Condition(self._lock)  # flush waits here

    def after_fork(self) -> None:
        """In a forked child: empty (the parent sends what it queued), fresh locks, no
        threads. The pid is set last (in _reset): no thread uses the engine half reset."""
        self._ledger.reset()
        self._reset()

    def _check_process(self) -> None:
        """Rebuild after a fork the hook missed, or for green threads patched in since."""
        if self._pid == os.getpid() and self._lock_type is threading.Lock:
            return
        with fork_lock():  # two threads of a forked child must not both reset
            if self._pid != os.getpid():
                self.after_fork()
            elif self._lock_type is not threading.Lock:
                # gevent or eventlet patched threading after this engine was built (gunicorn
                # -k gevent --preload): locks made before would block the whole process.
                # Threads started before the patch are left to leave on their own.
                self._primitives()
                self._crew = Crew()

    # -- the request thread ---------------------------------------------------------------

    def submit(self, call: Call, *, wake: bool = True) -> bool:
        """Take the call; ``False`` when it was dropped instead. Never blocks or raises.

        The request thread's path takes no lock: the call arrives in the ledger (a deque,
        appended to atomically) and is admitted into the queue at the next wake-up or take.
        The bound counts every call held: arriving, queued, being sent or waiting to retry,
        checked without the lock (racing threads may overfill it by a call each, each call
        still counted once).
        """
        self._check_process()
        if self._closed or self._unfinished.count + self._ledger.arriving >= self.max_queue_size:
            reason = "shutdown" if self._closed else "queue_full"
            self._ledger.dropped([call], reason, accepted=False)
            return False
        self._ledger.arrive(call)
        # Checked after arriving: a stop() that admitted the arrivals before this call
        # arrived has set _closed by now, so the call is dropped below, never stranded.
        if wake or self._closed or not (self._crew.workers or self._closes_seen):
            self._arrived(wake)
        self._ledger.announce(call)
        return True

    def _arrived(self, wake: bool) -> None:
        """submit()'s slow path: admit now, and wake or start a worker, or drop after stop()."""
        start = None
        with self._lock:
            if self._closed:
                late = self._ledger.admit()
            else:
                late = []
                if wake:
                    self._settle_next = False  # no response to leave the GIL to
                    start = self._release()
                elif not self._crew.workers and not self._closes_seen:
                    # Until a response is seen closed, one worker waits for the wake-up, or
                    # goes after WAKE_POLL if none comes (a test client never closes).
                    self._admit()
                    start = self._reserve()
        if start is not None:
            self._start(*start)
        if late:
            self._ledger.dropped(late, "shutdown", accepted=True)

    def wake(self, *, response_closed: bool = True) -> None:
        """Let the workers start on what is queued (never raises). Once a wake-up followed a
        closed response, requests leave starting workers to it (see :meth:`submit`)."""
        try:
            self._check_process()
            with self._lock:
                self._closes_seen = self._closes_seen or response_closed
                self._settle_next = response_closed
                start = self._release()
            if start is not None:
                self._start(*start)
        except Exception as exc:
            log_unexpected(exc, "waking the delivery threads", "they start on the next wake-up")

    def _admit(self) -> None:
        """Move the calls that arrived into the queue. Locked, and not once stopping."""
        calls = self._ledger.admit()
        for call in calls:
            self._queue.put(call)
        self._unfinished.count += len(calls)

    def _release(self) -> Optional[tuple[int, Crew]]:
        """Let workers take what is queued, and rouse one if they need it. Locked."""
        if self._stopping:
            return None
        self._admit()
        waiting = len(self._queue) + len(self._ready)
        if not waiting:
            return None
        self._released = True
        return self._rouse(waiting)

    def _rouse(self, waiting: int) -> Optional[tuple[int, Crew]]:
        """Wake one idle worker, or reserve a new one, if the awake ones are behind (see
        ``_waking``); one at a time, each woken worker rouses the next if needed. Locked."""
        crew = self._crew
        if not behind(waiting, crew.awake, self._queue.oldest()):
            return None
        if crew.idle:
            self._work.notify()
            return None
        return None if crew.starting else self._reserve()

    def _reserve(self) -> Optional[tuple[int, Crew]]:
        """Count in one more worker, if there is room; the caller starts it unlocked."""
        if self._crew.workers >= self.max_workers or self._stopping:
            return None
        return self._crew.reserve(), self._crew

    def _start(self, number: int, crew: Crew) -> None:
        if not self._exit_hooked:
            self._exit_hooked = True
            flush_when_multiprocessing_child_exits()
        thread = threading.Thread(
            target=self._run,
            args=(number, crew),
            name=f"{_THREAD_PREFIX}-{number}",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down, or no more threads
            with self._lock:
                self._count_out(number, crew, starting=True)
            logger.debug("flask-koala: could not start a delivery thread", exc_info=True)
            return
        with self._lock:
            crew.started(thread)

    # -- the workers ---------------------------------------------------------------------

    def _run(self, number: int, crew: Crew) -> None:
        channel: Optional[Channel] = None
        counted = True  # until _take says it has counted this worker out
        starting = True
        try:
            channel = self._handler.open()
            many = getattr(channel, "handle_many", None)
            with self._lock:
                crew.starting -= 1
                starting = False
                crew.channels[id(channel)] = channel
            while True:
                batches = self._take(number, crew, _MANY if many else 1)
                if batches is None:
                    counted = False
                    return
                try:
                    verdicts = many(batches) if many else [channel.handle(batches[0])]
                except Exception as exc:
                    log_unexpected(exc, "delivering a call", "it ends failed (internal_error)")
                    verdicts = [_INTERNAL_ERROR] * len(batches)
                for batch, verdict in zip(batches, verdicts):
                    self._settle(batch, verdict)
        except Exception as exc:
            log_unexpected(exc, "a delivery thread", "it stops")
        finally:
            if counted:
                with self._lock:
                    self._count_out(number, crew, starting=starting)
            if channel is not None:
                with self._lock:
                    crew.channels.pop(id(channel), None)
                close_quietly(channel)

    def _count_out(self, number: int, crew: Crew, *, starting: bool = False) -> None:
        """A worker is leaving (or never started). Locked."""
        crew.count_out(number, starting=starting)
        self._done.notify_all()  # a flush may be waiting on live workers

    def _take(self, number: int, crew: Crew, limit: int) -> Optional[list[Batch]]:
        """The next batches (``limit`` at most), once the workers were woken; ``None`` to leave.

        A worker that leaves is counted out here, under the lock, so a call queued at that
        moment sees one worker fewer and starts another.
        """
        waited = timed_out = False
        idle_since: Optional[float] = None
        while True:
            start, settle = None, False
            with self._lock:
                while True:
                    if self._stopping or crew is not self._crew:
                        self._count_out(number, crew)
                        return None
                    self._admit()
                    if timed_out and self._queue and not self._released:
                        self._released = True  # a wake-up that never came: go anyway
                    now = self._clock()
                    while self._timers and self._timers[0][0] <= now:
                        self._ready.append(heapq.heappop(self._timers)[2])
                    paused = self._gate.remaining()
                    work = bool(self._ready) or bool(self._queue and self._released)
                    if work and not paused:
                        if waited and self._settle_next and self._settle_for:
                            settle = True
                            break  # outside the lock
                        batches: list[Batch] = []
                        while work and len(batches) < limit:
                            batch = self._ready.popleft() if self._ready else self._queue.take()
                            batch.attempts += 1
                            self._unfinished.taken(batch)
                            batches.append(batch)
                            work = bool(self._ready) or bool(self._queue and self._released)
                        if not self._queue:
                            self._released = False
                        left = len(self._ready) + (len(self._queue) if self._released else 0)
                        start = self._rouse(left)
                        break
                    if work:
                        timeout: Optional[float] = paused
                    else:
                        if idle_since is None:
                            idle_since = now
                        timeout = idle_wait(
                            now - idle_since,
                            self._timers[0][0] - now if self._timers else None,
                            queued=bool(self._queue),
                            idle_timeout=self._idle_timeout,
                            app_gone=self._ledger.gone,
                            keeps_time=bool(self._timers) and crew.workers == 1,
                        )
                        if timeout is None:  # idle long enough, or the app is gone
                            self._count_out(number, crew)
                            return None
                    crew.idle += 1
                    try:
                        timed_out = not self._work.wait(timeout)
                    finally:
                        crew.idle -= 1
                    waited = True
            if start is not None:
                self._start(*start)
            if not settle:
                return batches
            # Woken by a response just sent: let the server finish it and logins queue up.
            time.sleep(self._settle_for)
            waited = False
            idle_since = None

    def _settle(self, batch: Batch, verdict: Verdict) -> None:
        """Record the verdict and end the batch, or put it on the timer heap."""
        with self._lock:
            owned = self._unfinished.answered(batch)
        if not owned:
            return  # the exit hook already counted it as dropped
        wait: Optional[float] = None
        try:
            if verdict.outcome == "retry" and verdict.retry_after is not None:
                self._gate.pause(verdict.retry_after)
            wait = conclude(self._ledger, self.policy, batch, verdict)
        except Exception as exc:
            log_unexpected(exc, "recording an outcome", "delivery goes on")
        with self._lock:
            shutdown = wait is not None and self._stopping
            if wait is not None and not shutdown:
                due = self._clock() + wait
                heapq.heappush(self._timers, (due, next(self._seq), batch))
                self._unfinished.retrying(batch)
                if self._crew.idle and self._timers[0][2] is batch:
                    self._work.notify()  # an idle worker must wait for this one instead
            elif self._unfinished.settled(batch):
                self._done.notify_all()
        if shutdown:
            self._ledger.failed(batch, "shutdown", error="shut down before its retry")

    # -- waiting and stopping ------------------------------------------------------------

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every call taken so far has ended; ``True`` when none of them is left.

        Calls taken once it has begun are not waited for (see ``_unfinished``).
        """
        self._check_process()
        deadline = None if timeout is None else self._clock() + max(timeout, 0.0)
        self.wake(response_closed=False)  # calls queued by a request not yet closed
        with self._lock:
            timers = (call for _, _, batch in self._timers for call in batch)
            queued = itertools.chain(self._queue, *self._ready, timers)
            return self._unfinished.flush(
                queued, self._done, lambda: bool(self._crew.workers), deadline, self._clock
            )

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Flush, then stop for good; later calls are dropped. Idempotent."""
        self._check_process()
        with self._lock:
            if self._closed:
                return self._unfinished.count == 0
        deadline = None if timeout is None else self._clock() + max(timeout, 0.0)
        flushed = self.flush(timeout)
        join = None if deadline is None else max(0.0, deadline - self._clock()) + _JOIN_GRACE
        self.stop(join_timeout=join)
        return flushed

    def stop(self, join_timeout: Optional[float], *, claim_inflight: bool = False) -> None:
        """Stop for good: drop what is queued, fail what waits to retry, let workers leave.

        ``join_timeout`` bounds the wait for a worker inside a request (``None`` waits);
        past it, attempts in flight are cut short (``_crew.cut_short``). At exit
        (``claim_inflight``) what is still in a worker's hands ends dropped instead.
        """
        with self._lock:
            self._closed = True
            self._stopping = True
            left = self._queue.clear()
            for batch in self._ready:
                left.extend(batch)
            self._ready.clear()
            waiting = [call for _, _, batch in self._timers for call in batch]
            self._timers.clear()
            self._unfinished.ended(left + waiting)
            left += self._ledger.admit()  # arrived, never admitted (nor in _unfinished)
            self._work.notify_all()
            self._done.notify_all()
            threads = list(self._crew.threads)
            channels = list(self._crew.channels.values())
        if left:
            self._ledger.dropped(left, "shutdown", accepted=True)
        if waiting:
            self._ledger.failed(waiting, "shutdown", error="shut down while waiting to retry")
        end = None if join_timeout is None else time.monotonic() + join_timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(None if end is None else max(0.0, end - time.monotonic()))
        if join_timeout is not None and not claim_inflight:
            cut_short(channels, threads, _CUT_GRACE)
        if claim_inflight:
            with self._lock:
                claimed = self._unfinished.claim()
            if claimed:
                self._ledger.dropped(claimed, "shutdown", accepted=True)

    @property
    def pending(self) -> int:
        """Calls queued, waiting to retry or being delivered in this process."""
        with self._lock:
            if self._pid != os.getpid():
                return 0
            return self._unfinished.count + (0 if self._stopping else self._ledger.arriving)

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` (or the exit hook) stopped it for good."""
        return self._closed

    def exit_flush(self, budget: float) -> None:
        """At interpreter exit: flush for ``budget`` seconds, then stop for good.

        Calls still in a worker's hands when it runs out end ``dropped`` (``shutdown``),
        not ``pending``: the process ends before their answer could.
        """
        # Nothing may reach stderr at exit: where the app set up no logging, warnings
        # about calls ending during this last flush would go to the last-resort handler.
        self._ledger.quiet = not logger.hasHandlers()
        left = 0 if self.flush(budget) else self.pending
        self._ledger.report_held()
        self._ledger.quiet = True
        self.stop(join_timeout=_EXIT_JOIN, claim_inflight=True)
        if left and logger.hasHandlers():
            logger.warning(
                "flask-koala: exiting with %d call(s) not delivered after %.1fs",
                left,
                self.shutdown_timeout,
            )
