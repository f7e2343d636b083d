"""The thread engine through its seams: a transport the test controls, a fake clock."""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import pytest

from flask_koala._config import Timeout
from flask_koala._delivery import HTTPHandler
from flask_koala._dispatchers import SyncDispatcher
from flask_koala._engine import Engine, Verdict
from flask_koala._ledger import Ledger
from flask_koala._payload import Call
from flask_koala._queue import Batch, PersonQueue
from flask_koala._retry import PauseGate, RetryPolicy
from flask_koala._transport import Response, Transport
from flask_koala._waking import BURST, HELP_AFTER

from .support import RecordingChannel, RecordingHandler, SlowResetLedger, koala_threads

URL = "http://127.0.0.1:9/web/projects/pk/batch"


def handler(transport: Callable[[], Transport], url: str = URL) -> HTTPHandler:
    return HTTPHandler({"profile": url}, timeout=1.0, transport_factory=transport)


PROFILE = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"


def person(n: int) -> str:
    return f"3f2504e0-4f89-41d3-9a0c-{n:012d}"


def identify(profile_id: str = PROFILE, email: str = "jane@example.com") -> Call:
    return Call.identify(profile_id=profile_id, email=email, traits={"email": email})


class GatedTransport:
    """Answers 200, but only once the test opens the gate; records every body."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once a post is waiting at the gate
        self.bodies: list[bytes] = []
        self.closed = 0
        self._lock = threading.Lock()

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout) -> Response:
        self.entered.set()
        self.gate.wait(10)
        with self._lock:
            self.bodies.append(body)
        return Response(200, "{}")

    def close(self) -> None:
        with self._lock:
            self.closed += 1


@pytest.fixture
def transport() -> GatedTransport:
    return GatedTransport()


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(lambda: None)


@pytest.fixture
def make_engine(transport: GatedTransport, ledger: Ledger) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(**options: Any) -> Engine:
        settings: dict[str, Any] = {
            "max_workers": 2,
            "max_queue_size": 100,
            "shutdown_timeout": 1.0,
            "policy": RetryPolicy(attempts=3, wait_initial=0.01),
        }
        settings.update(options)
        engine = Engine(handler(lambda: transport), ledger, **settings)
        engines.append(engine)
        return engine

    yield make
    transport.gate.set()
    for engine in engines:
        engine.shutdown(5)


# -- PersonQueue ---------------------------------------------------------------------------


def test_queue_is_fifo_across_people() -> None:
    queue = PersonQueue()
    first, second = identify(person(1)), identify(person(2))
    queue.put(first)
    queue.put(second)
    assert queue.take() == [first]
    assert queue.take() == [second]


def test_queue_groups_calls_about_one_person() -> None:
    queue = PersonQueue()
    a1, b1, a2 = identify(person(1)), identify(person(2)), identify(person(1))
    for call in (a1, b1, a2):
        queue.put(call)
    assert queue.take() == [a1, a2]
    assert len(queue) == 1


def test_queue_never_groups_different_emails_of_one_visitor() -> None:
    queue = PersonQueue()
    queue.put(identify(email="jane@example.com"))
    queue.put(identify(email="john@example.com"))
    assert len(queue.take()) == 1


def test_queue_batches_at_most_30_of_a_kind() -> None:
    queue = PersonQueue()
    for _ in range(45):
        queue.put(identify())
    assert len(queue.take()) == 30
    assert len(queue.take()) == 15
    assert len(queue) == 0


def test_queue_keeps_a_batch_within_the_body_limit() -> None:
    queue = PersonQueue()
    for _ in range(5):
        queue.put(identify()._replace(size=10_000))
    assert len(queue.take()) == 3  # 30,000 of 32,768 bytes
    assert len(queue.take()) == 2


def test_queue_sends_a_call_over_the_budget_alone() -> None:
    queue = PersonQueue()
    queue.put(identify()._replace(size=40_000))  # its exact body fit, its bound did not
    queue.put(identify())
    assert len(queue.take()) == 1
    assert len(queue.take()) == 1


def test_queue_hands_out_a_lone_call_as_a_batch() -> None:
    queue = PersonQueue()
    call = identify()
    queue.put(call)
    batch = queue.take()
    assert isinstance(batch, Batch)
    assert batch == [call]
    assert batch.attempts == 0


def test_queue_groups_an_identify_and_a_track_about_one_person() -> None:
    queue = PersonQueue()
    first = identify()
    event = Call.track(profile_id=PROFILE, email=first.email, event="Signed up", properties={})
    queue.put(first)
    queue.put(event)
    assert queue.take() == [first, event]


def test_queue_keeps_each_email_of_one_visitor_in_its_place() -> None:
    queue = PersonQueue()
    jane, other, john = identify(), identify(person(2)), identify(email="john@example.com")
    for call in (jane, other, john):
        queue.put(call)
    assert [queue.take(), queue.take(), queue.take()] == [[jane], [other], [john]]


def test_queue_groups_the_calls_of_a_visitors_second_email() -> None:
    queue = PersonQueue()
    jane, john1, john2 = (
        identify(),
        identify(email="john@example.com"),
        identify(email="john@example.com"),
    )
    for call in (jane, john1, john2):
        queue.put(call)
    assert queue.take() == [jane]
    assert queue.take() == [john1, john2]


def test_leftovers_of_a_second_emails_full_batch_keep_their_place() -> None:
    queue = PersonQueue()
    queue.put(identify())
    for _ in range(35):
        queue.put(identify(email="john@example.com"))
    later = identify(person(2))
    queue.put(later)
    assert len(queue.take()) == 1
    assert len(queue.take()) == 30
    assert [c.email for c in queue.take()] == ["john@example.com"] * 5
    assert queue.take() == [later]


def test_queue_groups_a_second_email_after_the_first_one_left() -> None:
    queue = PersonQueue()
    jane, john1, john2 = (
        identify(),
        identify(email="john@example.com"),
        identify(email="john@example.com"),
    )
    queue.put(jane)
    queue.put(john1)
    assert queue.take() == [jane]
    queue.put(john2)
    assert queue.take() == [john1, john2]
    assert len(queue) == 0


def test_queue_clear_returns_every_call_oldest_group_first() -> None:
    queue = PersonQueue()
    calls = [identify(), identify(person(2)), identify(email="john@example.com"), identify()]
    for call in calls:
        queue.put(call)
    assert queue.clear() == [calls[0], calls[3], calls[1], calls[2]]
    assert len(queue) == 0
    assert not queue


# -- lazy start, threads -------------------------------------------------------------------


def test_no_thread_before_the_first_call(make_engine: Callable[..., Engine]) -> None:
    make_engine()
    assert koala_threads() == []


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_first_call_starts_one_named_daemon_worker(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine(max_workers=3)
    engine.submit(identify())
    assert koala_threads() == ["flask-koala-1"]
    assert all(t.daemon for t in threading.enumerate() if t.name == "flask-koala-1")
    assert engine.flush(5)


def test_a_backlog_starts_workers_up_to_the_maximum(
    make_engine: Callable[..., Engine], transport: GatedTransport
) -> None:
    transport.gate.clear()
    engine = make_engine(max_workers=3, max_queue_size=1000)
    for n in range(3 * BURST):
        engine.submit(identify(person(n)))
    # The workers start one another, off the thread that submitted.
    assert wait_until(lambda: len(koala_threads()) == 3)
    names = koala_threads()
    assert names == ["flask-koala-1", "flask-koala-2", "flask-koala-3"]
    assert all(t.daemon for t in threading.enumerate() if t.name in names)
    transport.gate.set()
    assert engine.flush(5)
    assert len(koala_threads()) == 3


def test_a_small_burst_is_sent_by_one_worker(
    make_engine: Callable[..., Engine], transport: GatedTransport
) -> None:
    engine = make_engine(max_workers=3)
    for n in range(BURST // 2):
        engine.submit(identify(person(n)), wake=False)
    engine.wake()
    assert engine.flush(5)
    assert koala_threads() == ["flask-koala-1"]
    assert len(transport.bodies) == BURST // 2


def test_calls_left_waiting_behind_a_busy_worker_rouse_another(
    make_engine: Callable[..., Engine], transport: GatedTransport
) -> None:
    transport.gate.clear()
    engine = make_engine(max_workers=3)
    engine.submit(identify(person(0)))
    assert transport.entered.wait(5)  # the one worker is busy
    made_earlier = time.time() - 2 * HELP_AFTER
    for n in range(1, 3):
        engine.submit(identify(person(n))._replace(timestamp=made_earlier))
    assert wait_until(lambda: len(koala_threads()) == 3)
    transport.gate.set()
    assert engine.flush(5)


def test_each_worker_owns_one_transport(
    make_engine: Callable[..., Engine], transport: GatedTransport
) -> None:
    transport.gate.clear()
    engine = make_engine(max_workers=2)
    engine.submit(identify(person(1)))
    assert transport.entered.wait(5)
    engine.submit(identify(person(2))._replace(timestamp=time.time() - 2 * HELP_AFTER))
    assert wait_until(lambda: len(koala_threads()) == 2)
    transport.gate.set()
    engine.shutdown(5)
    assert transport.closed == 2


def test_shutdown_leaves_no_thread(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()
    engine.submit(identify())
    assert engine.shutdown(5)
    assert koala_threads() == []


# -- full queue ----------------------------------------------------------------------------


def test_full_queue_drops_without_blocking(
    make_engine: Callable[..., Engine], transport: GatedTransport, ledger: Ledger
) -> None:
    transport.gate.clear()
    engine = make_engine(max_workers=1, max_queue_size=3)
    results = [engine.submit(identify(person(n))) for n in range(10)]
    # At most three are held (waiting, or in the worker's hands); the rest are dropped.
    assert results.count(False) >= 7
    assert ledger.snapshot()["dropped.queue_full"] == results.count(False)


def test_calls_waiting_to_retry_count_against_the_bound(ledger: Ledger) -> None:
    # During an outage calls leave the queue for the retry timers; they are still held.
    failing = Recorder503()
    engine = Engine(
        handler(lambda: failing),
        ledger,
        policy=RetryPolicy(attempts=3, wait_initial=30, rng=lambda: 1.0),
        max_queue_size=3,
    )
    for n in range(3):
        assert engine.submit(identify(person(n)))
    assert wait_until(lambda: ledger.snapshot()["retried"] == 3)  # all three on the timers

    assert engine.submit(identify(person(3))) is False
    assert ledger.snapshot()["dropped.queue_full"] == 1
    engine.shutdown(0)


class Recorder503:
    """A collector in an outage: every post is answered 503."""

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout) -> Response:
        return Response(503, "{}")

    def close(self) -> None:
        pass


def test_drops_warn_at_most_once_a_minute_with_count(
    transport: GatedTransport, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    ledger = Ledger(lambda: None, clock=lambda: now[0])
    engine = Engine(
        handler(lambda: transport),
        ledger,
        policy=RetryPolicy(),
        max_workers=1,
        max_queue_size=1,
        shutdown_timeout=1,
    )
    transport.gate.clear()
    try:
        for n in range(5):
            engine.submit(identify(person(n)))
        now[0] = 61.0
        engine.submit(identify(person(99)))
    finally:
        transport.gate.set()
        engine.shutdown(5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "dropped 1 call(s) (queue_full)" in warnings[0]
    dropped = ledger.snapshot()["dropped.queue_full"]
    assert f"dropped {dropped - 1} call(s)" in warnings[1]


def test_drop_is_signalled(make_engine: Callable[..., Engine]) -> None:
    from flask_koala import signals

    sender = object()
    ledger = Ledger(lambda: sender)
    engine = Engine(
        handler(GatedTransport),
        ledger,
        policy=RetryPolicy(),
        max_workers=1,
        max_queue_size=1,
        shutdown_timeout=1,
    )
    engine.shutdown(0)
    seen: list[str] = []
    with signals.call_dropped.connected_to(lambda s, **kw: seen.append(kw["reason"]), sender):
        assert engine.submit(identify()) is False
    assert seen == ["shutdown"]


# -- flush and shutdown --------------------------------------------------------------------


def test_flush_without_calls_is_true(make_engine: Callable[..., Engine]) -> None:
    assert make_engine().flush(0.1)


def test_flush_is_bounded_and_reports_what_remains(
    make_engine: Callable[..., Engine], transport: GatedTransport
) -> None:
    transport.gate.clear()
    engine = make_engine()
    engine.submit(identify())
    assert engine.flush(0.2) is False
    assert engine.pending == 1
    transport.gate.set()
    assert engine.flush(5)


class BrokenHandler(RecordingHandler):
    """Every worker dies at once: calls are left with nobody to send them."""

    def open(self) -> RecordingChannel:
        raise OSError("no channel")


def test_flush_does_not_hang_when_workers_are_dead(
    make_seam_engine: Callable[..., Engine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_seam_engine(BrokenHandler())
    engine.submit(identify())
    assert engine.flush(None) is False
    caplog.clear()  # each dead worker logged its end, as it should


class SlowChannel(RecordingChannel):
    def handle(self, batch: Sequence[Call]) -> Verdict:
        time.sleep(0.02)  # a Koala that takes 20 ms per request
        return super().handle(batch)


class SlowHandler(RecordingHandler):
    def open(self) -> SlowChannel:
        return SlowChannel(self)


def test_flush_waits_for_the_calls_taken_before_it_not_those_after(
    make_seam_engine: Callable[..., Engine],
) -> None:
    handler = SlowHandler()
    engine = make_seam_engine(handler, max_workers=1)
    submit_people(engine, 3)
    stop = threading.Event()

    def keep_submitting() -> None:  # one call each 2 ms: ten times what one worker sends
        for n in range(100, 10_000):
            if stop.wait(0.002):
                return
            engine.submit(identify(person(n)))

    submitter = threading.Thread(target=keep_submitting)
    submitter.start()
    try:
        assert engine.flush(timeout=5) is True
        assert engine.pending > 0  # the calls taken since are still waiting
    finally:
        stop.set()
        submitter.join()
    assert [batch[0].profile_id for batch in handler.batches[:3]] == [person(n) for n in range(3)]


def test_shutdown_is_idempotent(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()
    engine.submit(identify())
    assert engine.shutdown(5)
    assert engine.shutdown(5)


def test_calls_after_shutdown_are_dropped_with_reason(
    make_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    engine = make_engine()
    engine.shutdown(1)
    assert engine.submit(identify()) is False
    assert ledger.snapshot()["dropped.shutdown"] == 1


def test_shutdown_timeout_drops_what_is_left(
    make_engine: Callable[..., Engine], transport: GatedTransport, ledger: Ledger
) -> None:
    transport.gate.clear()
    engine = make_engine(max_workers=1)
    for n in range(3):
        engine.submit(identify(person(n)))
    assert engine.shutdown(0.1) is False
    transport.gate.set()
    for thread in threading.enumerate():
        if thread.name.startswith("flask-koala-"):
            thread.join(5)
    counts = ledger.snapshot()
    assert counts["dropped.shutdown"] == 2
    assert counts["sent"] == 1
    assert counts["pending"] == 0


def test_every_accepted_call_ends_exactly_once(
    make_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    engine = make_engine(max_workers=4, max_queue_size=1000)
    for n in range(200):
        engine.submit(identify(person(n % 50)))
    assert engine.flush(10)
    counts = ledger.snapshot()
    assert counts["queued"] == 200
    assert counts["sent"] == 200
    assert counts["pending"] == 0


def test_same_person_waiting_together_share_a_request(
    make_engine: Callable[..., Engine], transport: GatedTransport
) -> None:
    transport.gate.clear()
    engine = make_engine(max_workers=1)
    engine.submit(identify(person(1)))  # taken by the worker, held at the gate
    for _ in range(3):
        engine.submit(identify(person(2)))
    transport.gate.set()
    assert engine.flush(5)
    assert len(transport.bodies) == 2
    assert transport.bodies[1].count(b'"type":"identify"') == 3


# -- sync ----------------------------------------------------------------------------------


def test_sync_dispatcher_sends_on_the_calling_thread(
    transport: GatedTransport, ledger: Ledger
) -> None:
    sync = SyncDispatcher(handler(lambda: transport), ledger, policy=RetryPolicy())
    assert sync.submit(identify())
    assert len(transport.bodies) == 1
    assert ledger.snapshot()["sent"] == 1
    assert koala_threads() == []
    sync.shutdown()
    assert transport.closed == 1


# -- fork ----------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_a_fresh_engine(
    make_engine: Callable[..., Engine], transport: GatedTransport, ledger: Ledger
) -> None:
    transport.gate.clear()
    engine = make_engine(max_workers=1)
    for n in range(3):
        engine.submit(identify(person(n)))  # the parent's, held at the gate
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking with threads running: that is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            inherited = engine.pending
            transport.gate.set()
            transport.bodies.clear()
            engine.submit(identify(person(9)))
            delivered = engine.flush(5)
            names = koala_threads()
            report = f"{inherited},{delivered},{len(transport.bodies)},{ledger.snapshot()['sent']}"
            report += f",{len(names)}"
            os.write(write, report.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0
    # The child starts empty (the parent sends its own calls), with its own live worker:
    # inherited, delivered, bodies, sent, threads.
    assert report.split(",") == ["0", "True", "1", "1", "1"]
    transport.gate.set()
    assert engine.flush(5)
    assert ledger.snapshot()["sent"] == 3


class ScriptedTransport:
    """Answers from a script, in the order requests arrive; records when each came."""

    def __init__(self, *answers: Response) -> None:
        self._answers = list(answers)
        self._lock = threading.Lock()
        self.times: list[float] = []

    def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout) -> Response:
        with self._lock:
            self.times.append(time.monotonic())
            return self._answers.pop(0) if self._answers else Response(200, "{}")

    def close(self) -> None:
        pass


def test_retry_after_also_holds_back_a_worker_already_backing_off(ledger: Ledger) -> None:
    transport = ScriptedTransport(Response(503), Response(429, retry_after="1"))
    engine = Engine(
        handler(lambda: transport),
        ledger,
        policy=RetryPolicy(attempts=4, wait_initial=0.3, rng=lambda: 1.0),
        max_workers=2,
        max_queue_size=10,
        shutdown_timeout=1,
    )
    try:
        engine.submit(identify(person(1)))  # 503: backs off 0.3 s
        deadline = time.monotonic() + 5
        while not transport.times and time.monotonic() < deadline:
            time.sleep(0.005)
        engine.submit(identify(person(2)))  # 429 Retry-After: 1, while the first waits
        assert engine.flush(10)
    finally:
        engine.shutdown(5)
    pause_started = transport.times[1]
    assert len(transport.times) == 4
    assert all(t - pause_started >= 1.0 for t in transport.times[2:])


# -- the Handler/Channel seam --------------------------------------------------------------


@pytest.fixture
def make_seam_engine(ledger: Ledger) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(handler: RecordingHandler, **options: Any) -> Engine:
        settings: dict[str, Any] = {
            "max_workers": 2,
            "max_queue_size": 100,
            "shutdown_timeout": 1.0,
            "policy": RetryPolicy(attempts=3, wait_initial=0.01),
        }
        settings.update(options)
        engine = Engine(handler, ledger, **settings)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(5)


@pytest.mark.parametrize(
    ("verdict", "counter"),
    [
        (Verdict("sent", status=202), "sent"),
        (Verdict("published"), "published"),
        (Verdict("dropped", "broker_error"), "dropped.broker_error"),
        (Verdict("failed", "http_400", 400, "nope"), "failed.http_400"),
    ],
)
def test_each_verdict_ends_the_batch_in_the_ledger(
    make_seam_engine: Callable[..., Engine], ledger: Ledger, verdict: Verdict, counter: str
) -> None:
    engine = make_seam_engine(RecordingHandler(verdict))
    engine.submit(identify())
    assert engine.flush(5)
    counts = ledger.snapshot()
    assert counts[counter] == 1
    assert counts["pending"] == 0


def test_a_retry_verdict_tries_again_up_to_the_attempts(
    make_seam_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    retry = Verdict("retry", "http_503", 503)
    handler = RecordingHandler(retry, retry, retry)
    engine = make_seam_engine(handler, policy=RetryPolicy(attempts=3, wait_initial=0.01))
    engine.submit(identify())
    assert engine.flush(5)
    counts = ledger.snapshot()
    assert len(handler.batches) == 3  # attempts count the first try
    assert counts["retried"] == 2
    assert counts["failed.retries_exhausted"] == 1


def test_a_handler_that_raises_fails_the_batch_once(
    make_seam_engine: Callable[..., Engine], ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(RecordingHandler):
        def open(self) -> RecordingChannel:
            channel = super().open()
            channel.handle = self.explode  # type: ignore[method-assign]
            return channel

        def explode(self, batch: Sequence[Call]) -> Verdict:
            raise ValueError("a bug in a handler")

    engine = make_seam_engine(Broken())
    engine.submit(identify())
    assert engine.flush(5)
    assert ledger.snapshot()["failed.internal_error"] == 1
    caplog.clear()  # the ERROR it logged is expected here


def test_a_waiting_retry_holds_no_worker(
    make_seam_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    handler = RecordingHandler(Verdict("retry", "http_503", 503))
    # One worker; the first call's retry is due in 30 s.
    engine = make_seam_engine(
        handler, max_workers=1, policy=RetryPolicy(attempts=3, wait_initial=30, rng=lambda: 1.0)
    )
    engine.submit(identify(person(1)))
    assert wait_until(lambda: ledger.snapshot()["retried"] == 1)
    engine.submit(identify(person(2)))
    assert wait_until(lambda: ledger.snapshot()["sent"] == 1)
    assert engine.pending == 1  # the first call, waiting on the timer, not in a worker
    assert engine.shutdown(0.1) is False
    assert ledger.snapshot()["failed.shutdown"] == 1
    assert ledger.snapshot()["pending"] == 0


def test_a_retry_reuses_the_batch_and_its_memo(
    make_seam_engine: Callable[..., Engine],
) -> None:
    handler = RecordingHandler(Verdict("retry", "timeout"))
    engine = make_seam_engine(handler)
    engine.submit(identify())
    assert engine.flush(5)
    first, second = handler.batches
    assert first == second


def test_the_http_channel_encodes_a_body_once_across_retries(
    make_engine: Callable[..., Engine], transport: GatedTransport, ledger: Ledger
) -> None:
    answers = [Response(503), Response(200, "{}")]

    class Flaky(GatedTransport):
        def post(
            self, url: str, body: bytes, headers: Mapping[str, str], timeout: Timeout
        ) -> Response:
            with self._lock:
                self.bodies.append(body)
                return answers.pop(0)

    flaky = Flaky()
    engine = Engine(
        handler(lambda: flaky), ledger, policy=RetryPolicy(attempts=3, wait_initial=0.01)
    )
    try:
        engine.submit(identify())
        assert engine.flush(5)
    finally:
        engine.shutdown(5)
    first, second = flaky.bodies
    assert first is second  # the very same bytes, not encoded again


class ManyChannel(RecordingChannel):
    """Takes several batches at once; each gets the next scripted verdict."""

    def __init__(self, owner: ManyHandler) -> None:
        super().__init__(owner)
        self._many = owner

    def handle_many(self, batches: Sequence[Sequence[Call]]) -> list[Verdict]:
        owner = self._many
        with owner.lock:
            owner.groups.append(len(batches))
        return [self.handle(batch) for batch in batches]


class ManyHandler(RecordingHandler):
    def __init__(self, *verdicts: Verdict) -> None:
        super().__init__(*verdicts)
        self.groups: list[int] = []

    def open(self) -> ManyChannel:
        self.open_gate.wait(10)
        return ManyChannel(self)


def submit_people(engine: Engine, count: int) -> None:
    """One call about each of ``count`` people (a batch each), then one wake-up."""
    for n in range(count):
        engine.submit(identify(person(n)), wake=False)
    engine.wake()


def test_a_channel_with_handle_many_gets_the_waiting_batches_at_once(
    make_seam_engine: Callable[..., Engine],
) -> None:
    handler = ManyHandler()
    engine = make_seam_engine(handler, max_workers=1)
    submit_people(engine, 5)
    assert engine.flush(5)
    assert handler.groups == [5]
    assert [batch[0].profile_id for batch in handler.batches] == [person(n) for n in range(5)]


def test_a_channel_with_handle_many_gets_at_most_32_batches_at_once(
    make_seam_engine: Callable[..., Engine],
) -> None:
    handler = ManyHandler()
    engine = make_seam_engine(handler, max_workers=1)
    submit_people(engine, 40)
    assert engine.flush(5)
    assert handler.groups == [32, 8]


def test_each_batch_handled_at_once_ends_with_its_own_verdict(
    make_seam_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    handler = ManyHandler(Verdict("published"), Verdict("dropped", "broker_error"))
    engine = make_seam_engine(handler, max_workers=1)
    submit_people(engine, 3)
    assert engine.flush(5)
    counts = ledger.snapshot()
    assert (counts["published"], counts["dropped.broker_error"], counts["sent"]) == (1, 1, 1)
    assert counts["pending"] == 0


def test_handle_many_that_raises_fails_each_batch_once(
    make_seam_engine: Callable[..., Engine], ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(ManyHandler):
        def open(self) -> ManyChannel:
            channel = super().open()
            channel.handle_many = self.explode  # type: ignore[method-assign]
            return channel

        def explode(self, batches: Sequence[Sequence[Call]]) -> list[Verdict]:
            raise ValueError("a bug in a handler")

    engine = make_seam_engine(Broken(), max_workers=1)
    submit_people(engine, 3)
    assert engine.flush(5)
    assert ledger.snapshot()["failed.internal_error"] == 3
    assert ledger.snapshot()["pending"] == 0
    caplog.clear()  # the ERROR it logged is expected here


# -- workers that come and go --------------------------------------------------------------


def test_a_burst_starts_one_thread_from_the_submitting_thread(
    make_seam_engine: Callable[..., Engine],
) -> None:
    handler = RecordingHandler()
    handler.open_gate.clear()  # workers stay in open(): none can start another
    engine = make_seam_engine(handler, max_workers=50)
    for n in range(100):
        engine.submit(identify(person(n)))
    assert koala_threads() == ["flask-koala-1"]
    handler.open_gate.set()
    assert engine.flush(10)


def test_a_request_burst_starts_one_thread_at_its_wake(
    make_seam_engine: Callable[..., Engine],
) -> None:
    handler = RecordingHandler()
    handler.open_gate.clear()
    engine = make_seam_engine(handler, max_workers=50)
    for n in range(100):
        engine.submit(identify(person(n)), wake=False)
    engine.wake()
    assert koala_threads() == ["flask-koala-1"]
    handler.open_gate.set()
    assert engine.flush(10)


def test_idle_workers_leave_and_start_again_on_the_next_call(
    make_seam_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    handler = RecordingHandler()
    engine = make_seam_engine(handler, idle_timeout=0.2)
    engine.submit(identify(person(1)))
    assert engine.flush(5)
    assert wait_until(lambda: koala_threads() == [])
    assert handler.closed == 1  # the worker closed its channel on its way out
    engine.submit(identify(person(2)))
    assert engine.flush(5)
    assert ledger.snapshot()["sent"] == 2


def test_a_worker_stays_to_keep_time_for_a_waiting_retry(
    make_seam_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    handler = RecordingHandler(Verdict("retry", "http_503", 503))
    engine = make_seam_engine(
        handler,
        idle_timeout=0.05,
        policy=RetryPolicy(attempts=2, wait_initial=0.5, rng=lambda: 1.0),
    )
    engine.submit(identify())
    assert engine.flush(5)
    assert ledger.snapshot()["sent"] == 1


# -- accounting ----------------------------------------------------------------------------


def test_pending_never_goes_negative_with_queue_full_drops(
    make_engine: Callable[..., Engine], transport: GatedTransport, ledger: Ledger
) -> None:
    transport.gate.clear()
    engine = make_engine(max_workers=1, max_queue_size=3)
    accepted = sum(engine.submit(identify(person(n))) for n in range(10))
    counts = ledger.snapshot()
    assert counts["dropped.queue_full"] == 10 - accepted
    assert counts["pending"] == engine.pending == accepted
    transport.gate.set()
    assert engine.flush(5)
    assert ledger.snapshot()["pending"] == engine.pending == 0


def test_leftovers_of_a_full_batch_keep_their_place_at_the_front() -> None:
    queue = PersonQueue()
    for _ in range(35):
        queue.put(identify(person(1)))
    later = identify(person(2))
    queue.put(later)
    assert len(queue.take()) == 30
    rest = queue.take()
    assert len(rest) == 5
    assert all(c.profile_id == person(1) for c in rest)
    assert queue.take() == [later]


def test_calls_for_different_routes_never_share_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from flask_koala._payload import ROUTES

    monkeypatch.setitem(ROUTES, "account", "account")
    queue = PersonQueue()
    profile = identify()
    account = profile._replace(kind="account")
    queue.put(profile)
    queue.put(account)
    assert queue.take() == [profile]
    assert queue.take() == [account]


def test_at_exit_calls_in_a_workers_hands_end_dropped(
    make_engine: Callable[..., Engine], transport: GatedTransport, ledger: Ledger
) -> None:
    transport.gate.clear()
    engine = make_engine(max_workers=1)
    engine.submit(identify())
    assert transport.entered.wait(5)
    engine.stop(join_timeout=0.05, claim_inflight=True)  # what the exit hook does
    transport.gate.set()
    for thread in threading.enumerate():
        if thread.name.startswith("flask-koala-"):
            thread.join(5)
    counts = ledger.snapshot()
    assert counts["dropped.shutdown"] == 1
    assert counts["sent"] == 0  # the answer that came later is not counted twice
    assert counts["pending"] == 0


# -- races ---------------------------------------------------------------------------------


def test_a_shorter_pause_never_overwrites_a_longer_one() -> None:
    # The first pause(1) reads the clock; while it does, another thread pauses for 10 s.
    # Without a lock around the read-modify-write, the 1 s pause would be written last.
    longer_done = threading.Event()
    first_read = threading.Event()
    calls = [0]

    def clock() -> float:
        calls[0] += 1
        if calls[0] == 1:
            first_read.set()
            longer_done.wait(0.5)
        return 100.0

    gate = PauseGate(clock)

    def pause_longer() -> None:
        first_read.wait(5)
        gate.pause(10)
        longer_done.set()

    other = threading.Thread(target=pause_longer)
    other.start()
    gate.pause(1)
    other.join(5)
    assert gate.remaining() == 10.0


def test_a_shorter_retry_after_never_cuts_a_longer_pause_short() -> None:
    gate = PauseGate(lambda: 100.0)
    gate.pause(10)
    gate.pause(1)
    assert gate.remaining() == 10.0


def test_two_threads_of_a_forked_child_do_not_both_reset(transport: GatedTransport) -> None:
    ledger = SlowResetLedger()
    engine = Engine(handler(lambda: transport), ledger, policy=RetryPolicy())
    try:
        engine._pid = -1  # the pid check's view of a fork its hook never saw

        first = threading.Thread(target=engine.submit, args=(identify(person(1)),))
        first.start()
        assert ledger.resetting.wait(5)
        engine.submit(identify(person(2)))
        first.join(5)
        assert engine.flush(5)
        counts = ledger.snapshot()
        assert (counts["queued"], counts["sent"], counts["pending"]) == (2, 2, 0)
    finally:
        engine.shutdown(5)


def test_a_call_queued_without_a_wake_goes_out_anyway_to_an_idle_worker(
    make_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    # As from a server (or test client) that never closes the response that queued it.
    engine = make_engine(max_workers=1)
    engine.submit(identify(person(1)))
    assert wait_until(lambda: ledger.snapshot()["sent"] == 1)
    engine.submit(identify(person(2)), wake=False)  # the worker is idle now
    assert wait_until(lambda: ledger.snapshot()["sent"] == 2, timeout=3)


def test_a_request_starts_a_worker_until_a_response_is_seen_closed(
    make_seam_engine: Callable[..., Engine],
) -> None:
    engine = make_seam_engine(RecordingHandler())
    engine.submit(identify(person(1)), wake=False)  # a server never seen closing a response
    assert len(koala_threads()) == 1  # waits for the wake-up, or goes after a while
    assert engine.flush(5)


def test_once_a_response_was_seen_closed_requests_start_no_thread(
    make_seam_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    engine = make_seam_engine(RecordingHandler(), idle_timeout=0.05)
    engine.submit(identify(person(1)), wake=False)
    engine.wake()  # the response closed
    assert engine.flush(5)
    assert wait_until(lambda: koala_threads() == [])
    engine.submit(identify(person(2)), wake=False)  # the request thread: no thread start
    assert koala_threads() == []
    engine.wake()  # after its response: the worker starts here
    assert engine.flush(5)
    assert ledger.snapshot()["sent"] == 2


def test_the_last_worker_waits_for_a_retry_without_spinning(
    make_seam_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    reads = []

    def clock() -> float:
        reads.append(1)
        return time.monotonic()

    handler = RecordingHandler(Verdict("retry", "http_503", 503))
    policy = RetryPolicy(attempts=2, wait_initial=30, rng=lambda: 1.0)
    engine = make_seam_engine(handler, policy=policy, max_workers=1, idle_timeout=0.05, clock=clock)
    engine.submit(identify())
    assert wait_until(lambda: ledger.snapshot().get("retried") == 1)
    time.sleep(0.2)  # idle past its idle_timeout, with the retry 30 s away
    before = len(reads)
    time.sleep(0.3)
    assert len(reads) - before < 10  # it waits; it does not poll the clock in a loop
    engine.stop(join_timeout=1)
