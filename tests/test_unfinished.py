"""What a flush waits for: the engine's unfinished calls when it began, struck off as they end."""

from __future__ import annotations

import threading
from typing import Callable

from flask_koala._payload import Call
from flask_koala._queue import Batch
from flask_koala._unfinished import Unfinished


def batch(n: int) -> Batch:
    profile_id = f"3f2504e0-4f89-41d3-9a0c-{n:012d}"
    return Batch([Call.identify(profile_id=profile_id, email="jane@example.com", traits={})])


def taken(unfinished: Unfinished, *batches: Batch) -> None:
    for one in batches:
        unfinished.count += len(one)
        unfinished.taken(one)


def flush(unfinished: Unfinished, working: Callable[[], bool], *queued: Batch) -> bool:
    """Flush with ``working`` called before each wait: a test's way to act while it waits."""
    done = threading.Condition()
    with done:
        calls = [call for one in queued for call in one]
        return unfinished.flush(calls, done, working, None, lambda: 0.0)


def test_a_flush_with_nothing_unfinished_returns_at_once() -> None:
    assert flush(Unfinished(), lambda: True)


def test_a_flush_ends_when_its_calls_have_though_later_ones_have_not() -> None:
    unfinished, before, after = Unfinished(), batch(1), batch(2)
    taken(unfinished, before)

    def meanwhile() -> bool:  # a later call is taken; then the earlier one ends
        taken(unfinished, after)
        assert unfinished.answered(before)
        unfinished.settled(before)
        return True

    assert flush(unfinished, meanwhile)
    assert unfinished.count == 1


def test_a_flush_waits_for_queued_calls_too() -> None:
    unfinished, queued = Unfinished(), batch(1)
    unfinished.count = 1
    waits: list[int] = []

    def meanwhile() -> bool:
        waits.append(1)
        unfinished.ended(queued)
        return True

    assert flush(unfinished, meanwhile, queued)
    assert waits == [1]


def test_a_flush_waits_for_a_batch_whose_outcome_is_being_recorded() -> None:
    unfinished, answered = Unfinished(), batch(1)
    taken(unfinished, answered)
    assert unfinished.answered(answered)  # out of a worker's hands, not ended yet
    waits: list[int] = []

    def meanwhile() -> bool:
        waits.append(1)
        unfinished.settled(answered)
        return True

    assert flush(unfinished, meanwhile)
    assert waits == [1]


def test_a_flush_gives_up_when_nobody_works() -> None:
    unfinished = Unfinished()
    taken(unfinished, batch(1))
    assert not flush(unfinished, lambda: False)


def test_a_batch_claimed_at_exit_ends_and_cannot_be_answered() -> None:
    unfinished, one = Unfinished(), batch(1)
    taken(unfinished, one)
    assert unfinished.claim() == list(one)
    assert unfinished.count == 0
    assert not unfinished.answered(one)
