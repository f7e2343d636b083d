"""The request thread's lock-free way into the engine: calls arrive in the ledger, counted at
once, and the engine admits them into its queue at the next wake-up or take (issue 14)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

from flask_koala._engine import Engine
from flask_koala._ledger import Ledger
from flask_koala._payload import Call
from flask_koala._retry import RetryPolicy

from .support import RecordingHandler


def identify(n: int = 1) -> Call:
    email = f"user{n}@example.com"
    profile_id = f"3f2504e0-4f89-41d3-9a0c-{n:012d}"
    return Call.identify(profile_id=profile_id, email=email, traits={"email": email})


class StopAsItArrives(Ledger):
    """Stops the engine between submit's shutdown check and the call's arrival: the race a
    request thread can lose against ``shutdown()`` on another thread."""

    engine: Optional[Engine] = None

    def arrive(self, call: Call) -> None:
        if self.engine is not None:
            self.engine.stop(join_timeout=1)
        super().arrive(call)


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(lambda: None)


@pytest.fixture
def make_engine() -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(ledger: Ledger, **options: Any) -> Engine:
        engine = Engine(RecordingHandler(), ledger, policy=RetryPolicy(attempts=1), **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(5)


def serving(engine: Engine) -> Engine:
    """As in a WSGI server once a response was seen closed: requests leave the workers
    asleep and submit without a lock."""
    engine.wake()
    return engine


def test_an_arrived_call_counts_as_queued_and_pending(ledger: Ledger) -> None:
    ledger.arrive(identify())
    counts = ledger.snapshot()
    assert (counts["queued"], counts["pending"]) == (1, 1)


def test_admit_takes_the_arrivals_oldest_first(ledger: Ledger) -> None:
    calls = [identify(n) for n in range(3)]
    for call in calls:
        ledger.arrive(call)
    assert ledger.admit() == calls
    assert ledger.arriving == 0


def test_admitted_calls_are_counted_once(ledger: Ledger) -> None:
    ledger.arrive(identify())
    ledger.admit()
    assert ledger.snapshot()["queued"] == 1


def test_a_request_threads_call_waits_for_the_wake_up(
    make_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    engine = serving(make_engine(ledger))
    assert engine.submit(identify(), wake=False)
    assert ledger.arriving == 1
    assert engine.pending == 1


def test_the_wake_up_admits_and_delivers_what_arrived(
    make_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    engine = serving(make_engine(ledger))
    for n in range(3):
        engine.submit(identify(n), wake=False)
    engine.wake()
    assert engine.flush(5)
    assert ledger.snapshot()["sent"] == 3


def test_the_queue_bound_counts_calls_not_yet_admitted(
    make_engine: Callable[..., Engine], ledger: Ledger
) -> None:
    engine = serving(make_engine(ledger, max_queue_size=2))
    results = [engine.submit(identify(n), wake=False) for n in range(3)]
    assert results == [True, True, False]
    assert ledger.snapshot()["dropped.queue_full"] == 1


def test_a_call_arriving_as_shutdown_stops_the_engine_is_dropped_not_stranded(
    make_engine: Callable[..., Engine],
) -> None:
    ledger = StopAsItArrives(lambda: None)
    engine = serving(make_engine(ledger))
    ledger.engine = engine
    engine.submit(identify(), wake=False)
    counts = ledger.snapshot()
    assert (counts["dropped.shutdown"], counts["pending"]) == (1, 0)
    assert ledger.arriving == 0
