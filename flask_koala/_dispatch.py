"""Getting accepted calls from the request thread to Koala.

A dispatcher takes a :class:`~flask_koala._payload.Call` with :meth:`Dispatcher.submit`,
which never blocks and never raises, and sees it to its end. Three live here:

- :class:`ThreadDispatcher`, the default: a bounded queue drained by daemon threads.
- :class:`SyncDispatcher`: delivers on the calling thread (``KOALA_SYNC``).
- :class:`SuppressedDispatcher`: records and goes no further (``KOALA_SUPPRESS_SEND``).

The thread engine starts its workers on the first call in each process, rebuilds itself in
a forked child (``os.register_at_fork`` and a pid check), and flushes for a bounded time at
interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from typing import Optional, Protocol

from ._delivery import Delivery, PauseGate
from ._ledger import Ledger
from ._payload import MAX_ENTRIES, Call
from ._transport import Transport, TransportFactory

__all__ = [
    "Dispatcher",
    "PersonQueue",
    "SuppressedDispatcher",
    "SyncDispatcher",
    "ThreadDispatcher",
]

logger = logging.getLogger("flask_koala")

_THREAD_PREFIX = "flask-koala"
_LIVENESS_CHECK = 0.25  # how often a flush without timeout checks that workers still live
# An idle worker looks at the queue this often even unwoken: a safety net for a wake-up
# that never came (a response whose close() the server never called).
_IDLE_POLL = 1.0
_SETTLE = 0.005  # how long a worker woken from idle leaves the GIL to the request threads
# How long shutdown(timeout) waits, beyond its timeout, for idle workers to leave: they do
# at once. A worker inside a request leaves when it ends (KOALA_TIMEOUT at most); it is a
# daemon thread, so it never holds up the process.
_JOIN_GRACE = 0.2
_EXIT_JOIN = 0.2  # at exit daemon threads die with the process; only wait to close sockets


class Dispatcher(Protocol):
    """Sees accepted calls to their end."""

    def submit(self, call: Call, *, wake: bool = True) -> bool:
        """Take the call; ``False`` when it was dropped instead. Never blocks or raises.

        ``wake=False`` leaves the workers asleep until :meth:`wake`: a request queues its
        calls and wakes the workers once its response has gone out.
        """
        ...

    def wake(self) -> None:
        """Let the workers start on what is queued."""
        ...

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every call taken so far has ended; ``True`` when none is left."""
        ...

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Flush, then stop for good; later calls are dropped. Idempotent."""
        ...


class SuppressedDispatcher:
    """Sending suppressed: each call is recorded (``call_accepted``) and ends there."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._closed = False

    def submit(self, call: Call, *, wake: bool = True) -> bool:
        if self._closed:
            self._ledger.dropped([call], "shutdown", accepted=False)
            return False
        self._ledger.suppressed(call)
        return True

    def wake(self) -> None:
        pass

    def flush(self, timeout: Optional[float] = None) -> bool:
        return True

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        self._closed = True
        return True


class SyncDispatcher:
    """Delivers on the calling thread, retries included: for tests and scripts."""

    def __init__(self, delivery: Delivery, transport_factory: TransportFactory) -> None:
        self._delivery = delivery
        self._transport_factory = transport_factory
        self._local = threading.local()
        self._closed = False
        _track(self)

    def wake(self) -> None:
        pass

    def submit(self, call: Call, *, wake: bool = True) -> bool:
        ledger = self._delivery.ledger
        if self._closed:
            ledger.dropped([call], "shutdown", accepted=False)
            return False
        ledger.accepted(call)
        ledger.announce(call)
        transport: Optional[Transport] = getattr(self._local, "transport", None)
        if transport is None:
            transport = self._local.transport = self._transport_factory()
        try:
            self._delivery.send([call], transport)
        except Exception:
            logger.exception("flask-koala: delivering a call failed unexpectedly")
            ledger.failed([call], "internal_error")
        return True

    def flush(self, timeout: Optional[float] = None) -> bool:
        return True

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        self._closed = True
        transport = getattr(self._local, "transport", None)
        if transport is not None:
            transport.close()
            del self._local.transport
        return True

    def _after_fork(self) -> None:
        # The parent's connections must not be shared with it.
        self._local = threading.local()
        self._delivery.ledger.reset()


class PersonQueue:
    """A FIFO of calls, grouped by person so that one request can carry several.

    Calls about the same person waiting together come out as one batch (at most 30 of
    each kind); the batch takes the place of the person's first call. Not thread-safe:
    the dispatcher holds its lock around every use.
    """

    def __init__(self) -> None:
        self._people: OrderedDict[tuple[Optional[str], Optional[str]], list[Call]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def put(self, call: Call) -> None:
        """Add a call at the back (or beside the same person's calls)."""
        calls = self._people.get(call.person)
        if calls is None:
            self._people[call.person] = [call]
        else:
            calls.append(call)
        self._size += 1

    def take(self) -> list[Call]:
        """Remove and return the oldest person's calls, at most 30 of each kind."""
        person, calls = self._people.popitem(last=False)
        batch, rest = _split(calls)
        if rest:
            self._people[person] = rest
            self._people.move_to_end(person, last=False)
        self._size -= len(batch)
        return batch

    def clear(self) -> list[Call]:
        """Remove and return everything."""
        calls = [call for group in self._people.values() for call in group]
        self._people.clear()
        self._size = 0
        return calls


def _split(calls: list[Call]) -> tuple[list[Call], list[Call]]:
    if len(calls) <= MAX_ENTRIES:
        return calls, []
    batch: list[Call] = []
    rest: list[Call] = []
    counts = {"identify": 0, "track": 0}
    for call in calls:
        if counts[call.kind] < MAX_ENTRIES:
            counts[call.kind] += 1
            batch.append(call)
        else:
            rest.append(call)
    return batch, rest


class ThreadDispatcher:
    """A bounded in-memory queue drained by daemon threads named ``flask-koala-<n>``.

    Args:
        delivery: sends a batch with retries and reports its end.
        transport_factory: makes one transport (one keep-alive connection pool) per worker.
        max_workers: threads started on the first accepted call in each process.
        max_queue_size: calls waiting beyond this are dropped, never blocked on.
        shutdown_timeout: how long the exit hook flushes before it gives up.
    """

    def __init__(
        self,
        delivery: Delivery,
        transport_factory: TransportFactory,
        *,
        max_workers: int,
        max_queue_size: int,
        shutdown_timeout: float,
    ) -> None:
        self._delivery = delivery
        self._ledger = delivery.ledger
        self._transport_factory = transport_factory
        self._max_workers = max_workers
        self._max_queue_size = max_queue_size
        self.shutdown_timeout = shutdown_timeout
        self._closed = False
        self._reset()
        _track(self)

    def _reset(self) -> None:
        """Fresh queue, locks, threads: at construction and in a forked child."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._queue = PersonQueue()
        self._unfinished = 0  # calls queued or being delivered
        # Whether workers may take what is queued: a request queues with wake=False and
        # releases the queue once its response is out.
        self._released = False
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._delivery.stop = threading.Event()
        self._delivery.gate = PauseGate()

    def _after_fork(self) -> None:
        # The parent still holds (and will send) what was queued; the child starts empty.
        self._reset()
        self._ledger.reset()

    # -- the request thread ---------------------------------------------------------------

    def submit(self, call: Call, *, wake: bool = True) -> bool:
        if self._pid != os.getpid():  # forked without our hook having run
            self._after_fork()
        with self._lock:
            if self._closed or self._stopping:
                accepted, reason = False, "shutdown"
            elif len(self._queue) >= self._max_queue_size:
                accepted, reason = False, "queue_full"
            else:
                accepted, reason = True, ""
                self._ledger.accepted(call)
                self._queue.put(call)
                self._unfinished += 1
                if not self._threads:
                    self._start_workers()
                if wake:
                    self._released = True
                    self._not_empty.notify()
        if accepted:
            self._ledger.announce(call)
        else:
            self._ledger.dropped([call], reason, accepted=False)
        return accepted

    def wake(self) -> None:
        """Wake as many idle workers as there are people waiting (never raises)."""
        try:
            with self._lock:
                if self._queue:
                    self._released = True
                    self._not_empty.notify(min(len(self._queue), self._max_workers))
        except Exception:
            logger.exception("flask-koala: waking the delivery threads failed")

    def _start_workers(self) -> None:
        _flush_when_multiprocessing_child_exits()
        for n in range(1, self._max_workers + 1):
            thread = threading.Thread(target=self._work, name=f"{_THREAD_PREFIX}-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # -- the workers ---------------------------------------------------------------------

    def _work(self) -> None:
        transport: Optional[Transport] = None
        try:
            transport = self._transport_factory()
            while True:
                batch = self._take()
                if batch is None:
                    return
                try:
                    self._delivery.send(batch, transport)
                except Exception:
                    logger.exception("flask-koala: delivering a call failed unexpectedly")
                    self._ledger.failed(batch, "internal_error")
                finally:
                    self._done(len(batch))
        except Exception:
            logger.exception("flask-koala: a delivery thread stopped unexpectedly")
        finally:
            if transport is not None:
                transport.close()

    def _take(self) -> Optional[list[Call]]:
        """The next batch, once the workers were woken for it; ``None`` when stopping."""
        waited = False
        while True:
            with self._lock:
                while not (self._queue and self._released):
                    if self._stopping:
                        return None
                    if not self._not_empty.wait(_IDLE_POLL) and self._queue:
                        self._released = True  # a wake-up that never came: go anyway
                    waited = True
                if not waited:
                    batch = self._queue.take()
                    if not self._queue:
                        self._released = False
                    return batch
            # Woken from idle: the response that queued the call has only just gone out.
            # Let the server thread finish with it before competing for the GIL.
            time.sleep(_SETTLE)
            waited = False

    def _done(self, count: int) -> None:
        with self._lock:
            self._unfinished -= count
            if self._unfinished <= 0:
                self._idle.notify_all()

    # -- waiting and stopping ------------------------------------------------------------

    def flush(self, timeout: Optional[float] = None) -> bool:
        if self._pid != os.getpid():
            self._after_fork()
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        self.wake()  # calls queued by a request whose response has not closed yet
        with self._lock:
            while self._unfinished > 0:
                if not any(t.is_alive() for t in self._threads):
                    # Never started, or killed: nothing will ever finish what is left.
                    return False
                wait = _LIVENESS_CHECK
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return False
                self._idle.wait(wait)
            return True

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            if self._closed:
                return self._unfinished == 0
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        flushed = self.flush(timeout)
        join = None if deadline is None else max(0.0, deadline - time.monotonic()) + _JOIN_GRACE
        self._stop(join_timeout=join)
        return flushed

    def _stop(self, join_timeout: Optional[float]) -> None:
        """Stop for good: drop what is still queued, end waits, let the workers leave.

        A worker inside a request leaves once it ends (``KOALA_TIMEOUT`` at most);
        ``join_timeout`` bounds how long to wait for that, ``None`` waits.
        """
        with self._lock:
            self._closed = True
            self._stopping = True
            left = self._queue.clear()
            self._unfinished -= len(left)
            self._not_empty.notify_all()
            threads = list(self._threads)
        self._delivery.stop.set()
        if left:
            self._ledger.dropped(left, "shutdown", accepted=True)
        end = None if join_timeout is None else time.monotonic() + join_timeout
        for thread in threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))

    @property
    def pending(self) -> int:
        """Calls queued or being delivered in this process."""
        with self._lock:
            return self._unfinished if self._pid == os.getpid() else 0


# -- process lifecycle ---------------------------------------------------------------------

_live: weakref.WeakSet[ThreadDispatcher | SyncDispatcher] = weakref.WeakSet()


def _track(dispatcher: ThreadDispatcher | SyncDispatcher) -> None:
    _live.add(dispatcher)


def _after_fork_in_child() -> None:
    for dispatcher in list(_live):
        dispatcher._after_fork()


def _flush_when_multiprocessing_child_exits() -> None:
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
    engines = [d for d in list(_live) if isinstance(d, ThreadDispatcher) and not d._closed]
    if not engines:
        return
    deadline = time.monotonic() + max(e.shutdown_timeout for e in engines)
    for engine in engines:
        try:
            budget = min(engine.shutdown_timeout, max(0.0, deadline - time.monotonic()))
            # Nothing may reach stderr at exit: where the app set up no logging, warnings
            # about calls ending during this last flush would go to the last-resort handler.
            engine._ledger.quiet = not logger.hasHandlers()
            left = 0 if engine.flush(budget) else engine.pending
            engine._ledger.quiet = True
            engine._stop(join_timeout=_EXIT_JOIN)
            # Only where the app listens: at exit, logging's last-resort handler would
            # print to stderr, and an exit must stay quiet.
            if left and logger.hasHandlers():
                logger.warning(
                    "flask-koala: exiting with %d call(s) not delivered after %.1fs",
                    left,
                    engine.shutdown_timeout,
                )
        except Exception:
            pass  # at exit there is nobody left to tell


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown_at_exit)
