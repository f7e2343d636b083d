"""The waking rule: how many delivery threads a backlog needs awake, and how long one idles."""

from __future__ import annotations

import time

from flask_koala._waking import BURST, HELP_AFTER, WAKE_POLL, behind, idle_wait


def test_nothing_waiting_needs_no_worker() -> None:
    assert not behind(0, 0, None)


def test_a_call_with_no_worker_awake_needs_one() -> None:
    assert behind(1, 0, time.time())


def test_an_awake_worker_takes_a_fresh_burst_alone() -> None:
    assert not behind(BURST - 1, 1, time.time())


def test_a_burst_per_awake_worker_needs_another() -> None:
    assert behind(2 * BURST, 2, time.time())


def test_a_call_waiting_too_long_needs_another() -> None:
    assert behind(1, 3, time.time() - 2 * HELP_AFTER)


def test_an_idle_worker_waits_for_the_next_retry() -> None:
    wait = idle_wait(0.0, 0.3, queued=False, idle_timeout=5.0, app_gone=False, keeps_time=False)
    assert wait == 0.3


def test_an_idle_worker_polls_for_calls_never_woken_for() -> None:
    wait = idle_wait(0.0, None, queued=True, idle_timeout=5.0, app_gone=True, keeps_time=False)
    assert wait == WAKE_POLL


def test_an_idle_worker_leaves_after_the_idle_timeout() -> None:
    wait = idle_wait(5.0, None, queued=False, idle_timeout=5.0, app_gone=False, keeps_time=False)
    assert wait is None


def test_a_worker_leaves_once_its_app_is_gone() -> None:
    wait = idle_wait(0.0, None, queued=False, idle_timeout=5.0, app_gone=True, keeps_time=False)
    assert wait is None


def test_the_last_worker_stays_to_keep_time_for_a_retry() -> None:
    wait = idle_wait(9.0, 30.0, queued=False, idle_timeout=5.0, app_gone=True, keeps_time=True)
    assert wait == WAKE_POLL
