"""The dispatchers and the registry that picks one per mode."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from flask_koala._config import KoalaConfig, Timeout
from flask_koala._delivery import HTTPHandler
from flask_koala._dispatchers import (
    IDLE_CHANNELS,
    REGISTRY,
    IdleChannels,
    Needs,
    SuppressedDispatcher,
    SyncDispatcher,
    make_dispatcher,
)
from flask_koala._engine import Engine
from flask_koala._ledger import Ledger
from flask_koala._payload import Call
from flask_koala._retry import RetryPolicy
from flask_koala._transport import Response

from .support import SlowResetLedger

ROOT = Path(__file__).resolve().parent.parent
PROFILE = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"


def identify() -> Call:
    return Call.identify(profile_id=PROFILE, email="jane@example.com", traits={})


class Recorder:
    """A transport that answers from a script and counts what it was asked."""

    def __init__(self, *answers: Response) -> None:
        self.answers = list(answers)
        self.posts = 0
        self.closed = 0
        self.threads: set[int] = set()

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout) -> Response:
        self.posts += 1
        self.threads.add(threading.get_ident())
        return self.answers.pop(0) if self.answers else Response(200, "{}")

    def close(self) -> None:
        self.closed += 1


def sync_dispatcher(ledger: Ledger, *transports: Recorder, **policy: Any) -> SyncDispatcher:
    made = iter(transports)
    handler = HTTPHandler(
        {"profile": "http://127.0.0.1:9/b"}, timeout=1.0, transport_factory=lambda: next(made)
    )
    return SyncDispatcher(handler, ledger, policy=RetryPolicy(**policy), sleep=lambda s: None)


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(lambda: None)


# -- the registry --------------------------------------------------------------------------


def needs(ledger: Ledger) -> Needs:
    return Needs(ledger, Recorder)


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (KoalaConfig(public_key="pk"), Engine),
        (KoalaConfig(public_key="pk", sync=True), SyncDispatcher),
        (KoalaConfig(public_key="pk", suppress_send=True), SuppressedDispatcher),
    ],
)
def test_the_mode_picks_the_dispatcher(
    ledger: Ledger, config: KoalaConfig, kind: type[Any]
) -> None:
    dispatcher = make_dispatcher(config, needs(ledger))
    try:
        assert isinstance(dispatcher, kind)
    finally:
        assert dispatcher is not None
        dispatcher.shutdown(1)


def test_disabled_has_no_dispatcher(ledger: Ledger) -> None:
    assert make_dispatcher(KoalaConfig(enabled=False), needs(ledger)) is None


def test_every_mode_but_disabled_is_registered() -> None:
    assert set(REGISTRY) == {"thread", "sync", "suppressed", "celery"}


def test_thread_mode_reads_its_settings(ledger: Ledger) -> None:
    config = KoalaConfig(public_key="pk", max_workers=3, max_queue_size=7, max_retries=2)
    engine = make_dispatcher(config, needs(ledger))
    assert isinstance(engine, Engine)
    try:
        assert engine.max_workers == 3
        assert engine.max_queue_size == 7
        assert engine.policy.attempts == 3  # two retries after the first try
    finally:
        engine.shutdown(1)


def test_importing_the_package_loads_no_celery() -> None:
    code = (
        "import sys, flask_koala, flask_koala._dispatchers;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu', 'redis')"
        " or m == 'flask_koala.celery'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- sync ----------------------------------------------------------------------------------


def test_sync_retries_on_the_calling_thread(ledger: Ledger) -> None:
    transport = Recorder(Response(503), Response(200, "{}"))
    sync = sync_dispatcher(ledger, transport)
    assert sync.submit(identify())
    counts = ledger.snapshot()
    assert (counts["sent"], counts["retried"], counts["pending"]) == (1, 1, 0)
    assert transport.threads == {threading.get_ident()}
    sync.shutdown()


def test_sync_gives_up_after_its_attempts(ledger: Ledger) -> None:
    transport = Recorder(Response(503), Response(503), Response(503))
    sync = sync_dispatcher(ledger, transport, attempts=2)
    sync.submit(identify())
    assert transport.posts == 2
    assert ledger.snapshot()["failed.retries_exhausted"] == 1
    sync.shutdown()


class Held(Recorder):
    """A recorder whose posts wait until ``release`` is set; ``entered`` counts them in."""

    def __init__(self, entered: threading.Semaphore, release: threading.Event) -> None:
        super().__init__()
        self.entered, self.release = entered, release

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout) -> Response:
        self.entered.release()
        self.release.wait(5)
        return super().post(url, body, headers, timeout)


def test_sync_opens_a_connection_per_call_in_flight_and_shutdown_closes_them_all(
    ledger: Ledger,
) -> None:
    entered, release = threading.Semaphore(0), threading.Event()
    transports = [Held(entered, release) for _ in range(3)]
    sync = sync_dispatcher(ledger, *transports)
    threads = [threading.Thread(target=sync.submit, args=(identify(),)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert entered.acquire(timeout=5)  # three calls in flight at once
    release.set()
    for thread in threads:
        thread.join(5)
    sync.shutdown()
    assert [t.closed for t in transports] == [1, 1, 1]


def test_sync_calls_one_after_another_share_one_connection_whatever_their_thread(
    ledger: Ledger,
) -> None:
    # A server with a thread (or a greenlet) per request must not keep a socket per request.
    transport = Recorder()
    sync = sync_dispatcher(ledger, transport)  # a second connection would find no transport
    for _ in range(5):
        thread = threading.Thread(target=sync.submit, args=(identify(),))
        thread.start()
        thread.join(5)
    assert transport.posts == 5
    sync.shutdown()
    assert transport.closed == 1


def test_two_threads_of_a_forked_child_reset_a_sync_dispatcher_once() -> None:
    ledger = SlowResetLedger()
    sync = sync_dispatcher(ledger, Recorder(), Recorder())
    sync._pid = -1  # the pid check's view of a fork its hook never saw
    first = threading.Thread(target=sync.submit, args=(identify(),))
    first.start()
    assert ledger.resetting.wait(5)
    sync.submit(identify())
    first.join(5)
    counts = ledger.snapshot()
    assert (counts["queued"], counts["sent"], counts["pending"]) == (2, 2, 0)


def test_a_forked_child_never_reuses_the_parents_idle_connection(ledger: Ledger) -> None:
    parents, childs = Recorder(), Recorder()
    sync = sync_dispatcher(ledger, parents, childs)
    sync.submit(identify())  # the parent's connection now waits, idle, in IDLE_CHANNELS
    # A child forked from C: no fork hook ran, and both pids it kept are not its own.
    sync._pid = IDLE_CHANNELS._pid = -1
    sync.submit(identify())
    sync.shutdown()
    assert (parents.posts, childs.posts) == (1, 1)


def test_a_dropped_sync_dispatcher_closes_its_connections(ledger: Ledger) -> None:
    import gc

    transport = Recorder()
    sync = sync_dispatcher(ledger, transport)
    sync.submit(identify())
    del sync
    gc.collect()
    assert transport.closed == 1


def test_sync_after_shutdown_drops(ledger: Ledger) -> None:
    sync = sync_dispatcher(ledger, Recorder())
    sync.shutdown()
    assert sync.submit(identify()) is False
    assert ledger.snapshot()["dropped.shutdown"] == 1


# -- suppressed ----------------------------------------------------------------------------


def test_suppressed_records_and_goes_no_further(ledger: Ledger) -> None:
    suppressed = SuppressedDispatcher(ledger)
    assert suppressed.submit(identify())
    assert ledger.snapshot()["suppressed"] == 1
    assert suppressed.pending == 0


class _Closable:
    closed = 0

    def handle(self, batch: Any) -> Any:
        raise AssertionError("not used")

    def close(self) -> None:
        self.closed += 1


def test_idle_channels_close_the_one_idle_longest_past_the_limit() -> None:
    pool = IdleChannels(2)
    first: list[Any] = []
    second: list[Any] = []
    a, b, c = _Closable(), _Closable(), _Closable()
    first += [a, b]
    second.append(c)
    for channel, owner in ((a, first), (b, first), (c, second)):
        pool.give_back(channel, owner)

    assert (a.closed, b.closed, c.closed) == (1, 0, 0)
    assert first == [b]  # its dispatcher no longer counts it among its connections
    assert pool.take(first) is b
    assert pool.take(first) is None  # never another dispatcher's channel
    assert pool.take(second) is c
