"""How accepted calls leave the request thread: the dispatchers, chosen by mode.

A dispatcher takes a :class:`~flask_koala._payload.Call` with :meth:`Dispatcher.submit`,
which never blocks on the network and never raises, and sees it to its end. The mode
(:attr:`~flask_koala._config.KoalaConfig.mode`) picks one from :data:`REGISTRY`, and each
factory reads its own settings:

- ``"thread"``: the thread engine (:class:`~flask_koala._engine.Engine`) with the HTTP
  handler, the default;
- ``"sync"``: :class:`SyncDispatcher`, delivery on the calling thread (``KOALA_SYNC``);
- ``"suppressed"``: :class:`SuppressedDispatcher`, record and go no further;
- ``"celery"``: the thread engine with a publishing handler (``flask_koala.celery``,
  imported only when chosen, so ``import flask_koala`` never loads Celery).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable, NamedTuple, Optional, Protocol

from ._config import KoalaConfig
from ._delivery import HTTPHandler
from ._engine import Channel, Engine, Handler, Verdict, conclude
from ._handlers import close_quietly
from ._ledger import Ledger, log_unexpected
from ._lifecycle import fork_lock, track
from ._payload import Call
from ._queue import Batch
from ._retry import PauseGate, RetryPolicy
from ._transport import TransportFactory

__all__ = [
    "IDLE_CHANNELS",
    "REGISTRY",
    "Dispatcher",
    "IdleChannels",
    "Needs",
    "SuppressedDispatcher",
    "SyncDispatcher",
    "make_dispatcher",
]


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

    @property
    def pending(self) -> int:
        """Calls taken and not ended yet, in this process."""
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

    @property
    def pending(self) -> int:
        return 0


class SyncDispatcher:
    """Delivers on the calling thread, retries included: for tests and scripts.

    A call takes an idle channel, or opens one, and gives it back once done: there are as
    many connections as calls in flight at once, whichever threads or greenlets make them
    (a thread-local would hold one per thread ever seen, and under gevent patched after
    ``init_app`` be one slot that every greenlet shares). Idle ones wait in
    :data:`IDLE_CHANNELS`, a handful for the whole process. :meth:`shutdown` closes them
    all, and so does the garbage collector when the dispatcher is dropped without one.
    """

    def __init__(
        self,
        handler: Handler,
        ledger: Ledger,
        *,
        policy: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._handler = handler
        self._ledger = ledger
        self._policy = policy
        self._clock = clock
        self._sleep = sleep
        self._closed = False
        self._channels: list[Channel] = []  # every open one, idle or in a call's hands
        self._fresh()
        # A module-level function over the list only: the finalizer must not keep us alive.
        self._finalizer = weakref.finalize(self, _release, self._channels)
        track(self)

    def _fresh(self) -> None:
        # Held for list operations only, never across a yield: safe under gevent too.
        self._lock = threading.Lock()
        self._gate = PauseGate(self._clock)
        self._pid = os.getpid()

    def after_fork(self) -> None:
        """In a forked child: the parent's connections are the parent's; forget them."""
        # The pid is set last (in _fresh): no other thread uses the dispatcher half reset.
        IDLE_CHANNELS.after_fork()  # a server that forks from C runs no fork hooks
        self._channels.clear()
        self._ledger.reset()
        self._fresh()

    def wake(self) -> None:
        pass

    def submit(self, call: Call, *, wake: bool = True) -> bool:
        if self._pid != os.getpid():
            with fork_lock():  # two threads of a child forked from C must not both reset
                if self._pid != os.getpid():
                    self.after_fork()
        ledger = self._ledger
        if self._closed:
            ledger.dropped([call], "shutdown", accepted=False)
            return False
        ledger.accepted(call)
        ledger.announce(call)
        batch = Batch([call])
        try:
            self._deliver(batch)
        except Exception as exc:
            log_unexpected(exc, "delivering a call", "it ends failed (internal_error)")
            ledger.failed(batch, "internal_error")
        return True

    def _deliver(self, batch: Batch) -> None:
        channel = self._take_channel()
        try:
            while True:
                self._sleep(self._gate.remaining())
                batch.attempts += 1
                verdict: Verdict = channel.handle(batch)
                if verdict.outcome == "retry" and verdict.retry_after is not None:
                    self._gate.pause(verdict.retry_after)
                wait = conclude(self._ledger, self._policy, batch, verdict)
                if wait is None:
                    return
                self._sleep(wait)
        finally:
            if not self._closed:
                IDLE_CHANNELS.give_back(channel, self._channels)

    def _take_channel(self) -> Channel:
        channel = IDLE_CHANNELS.take(self._channels)
        if channel is not None:
            return channel
        channel = self._handler.open()
        with self._lock:
            self._channels.append(channel)
        return channel

    def flush(self, timeout: Optional[float] = None) -> bool:
        return True

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Stop taking calls and close every channel, idle or in another thread's hands."""
        self._closed = True
        _release(self._channels)
        return True

    @property
    def pending(self) -> int:
        return 0


class IdleChannels:
    """The idle channels of every sync dispatcher in the process: at most ``limit`` of them
    together, the least recently used closed first.

    A test suite makes an app per test and drops it without ``shutdown()``; a Flask app sits
    in reference cycles, so it (and a connection it kept) lasts until a full collection of
    the cyclic garbage collector, which may be hundreds of apps later. Kept here, a process
    holds a handful of idle connections however many apps it made and dropped, and a call
    still reuses its own dispatcher's connection when one is idle.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pid = -1
        self.after_fork()
        track(self)

    def after_fork(self) -> None:
        """In a forked child the parent's connections are the parent's: forget them (once,
        whether the fork hook or the first sync dispatcher to notice the fork calls it)."""
        pid = os.getpid()
        if self._pid == pid:
            return
        # Held for dict operations only, never across a yield: safe under gevent too.
        self._lock = threading.Lock()
        # id(channel) -> (channel, the channels list of the dispatcher it belongs to)
        self._idle: OrderedDict[int, tuple[Channel, list[Channel]]] = OrderedDict()
        self._pid = pid

    def take(self, owner: list[Channel]) -> Optional[Channel]:
        """The most recently used idle channel of the dispatcher ``owner`` lists, if any."""
        with self._lock:
            for key in reversed(self._idle):
                channel, its_owner = self._idle[key]
                if its_owner is owner:
                    del self._idle[key]
                    return channel
        return None

    def give_back(self, channel: Channel, owner: list[Channel]) -> None:
        """Keep ``channel`` idle; past the limit, close the one idle longest."""
        with self._lock:
            self._idle[id(channel)] = (channel, owner)
            if len(self._idle) <= self._limit:
                return
            _, (oldest, its_owner) = self._idle.popitem(last=False)
            with contextlib.suppress(ValueError):  # its dispatcher was shut down meanwhile
                its_owner.remove(oldest)
        close_quietly(oldest)

    def forget(self, owner: list[Channel]) -> None:
        """Drop the idle channels of the dispatcher ``owner`` lists (it closes them)."""
        with self._lock:
            for key in [k for k, (_, o) in self._idle.items() if o is owner]:
                del self._idle[key]


#: The most idle connections sync dispatchers keep, all apps of a process together.
SYNC_IDLE_LIMIT = 4
IDLE_CHANNELS = IdleChannels(SYNC_IDLE_LIMIT)


def _release(channels: list[Channel]) -> None:
    """Close every channel of a dispatcher that is shut down or collected."""
    IDLE_CHANNELS.forget(channels)
    while channels:
        close_quietly(channels.pop())


# -- the registry --------------------------------------------------------------------------


class Needs(NamedTuple):
    """What a factory may need beyond the config: made once per app by the extension."""

    ledger: Ledger
    transport_factory: TransportFactory
    celery_app: Any = None


Factory = Callable[[KoalaConfig, Needs], Dispatcher]


def _http_handler(config: KoalaConfig, needs: Needs) -> HTTPHandler:
    return HTTPHandler(
        {"profile": config.endpoint},
        timeout=config.timeout,
        transport_factory=needs.transport_factory,
    )


def _thread(config: KoalaConfig, needs: Needs) -> Dispatcher:
    return Engine(
        _http_handler(config, needs),
        needs.ledger,
        policy=RetryPolicy.from_retries(config.max_retries),
        max_workers=config.max_workers,
        max_queue_size=config.max_queue_size,
        shutdown_timeout=config.shutdown_timeout,
    )


def _sync(config: KoalaConfig, needs: Needs) -> Dispatcher:
    return SyncDispatcher(
        _http_handler(config, needs),
        needs.ledger,
        policy=RetryPolicy.from_retries(config.max_retries),
    )


def _suppressed(config: KoalaConfig, needs: Needs) -> Dispatcher:
    return SuppressedDispatcher(needs.ledger)


def _celery(config: KoalaConfig, needs: Needs) -> Dispatcher:
    from ._celery_publish import CeleryDispatcher  # Celery is an optional extra

    return CeleryDispatcher.from_config(config, needs.ledger, needs.celery_app)


#: The dispatcher factory of each mode; ``"disabled"`` has none.
REGISTRY: dict[str, Factory] = {
    "thread": _thread,
    "sync": _sync,
    "suppressed": _suppressed,
    "celery": _celery,
}


def make_dispatcher(config: KoalaConfig, needs: Needs) -> Optional[Dispatcher]:
    """The dispatcher for the config's mode; ``None`` when flask-koala is disabled."""
    factory = REGISTRY.get(config.mode)
    return None if factory is None else factory(config, needs)
