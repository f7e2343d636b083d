"""The engine's count of its delivery threads."""

from __future__ import annotations

import threading

from flask_koala._crew import Crew


def test_a_worker_gets_the_lowest_free_number() -> None:
    crew = Crew()
    first, second = crew.reserve(), crew.reserve()
    crew.count_out(first, starting=True)
    assert (first, second, crew.reserve()) == (1, 2, 1)


def test_a_reserved_worker_counts_as_starting() -> None:
    crew = Crew()
    crew.reserve()
    assert (crew.workers, crew.starting) == (1, 1)


def test_counting_out_a_running_worker_leaves_the_starting_count() -> None:
    crew = Crew()
    number = crew.reserve()
    crew.starting -= 1  # it started
    crew.count_out(number)
    assert (crew.workers, crew.starting, crew.numbers) == (0, 0, set())


def test_idle_workers_are_not_awake() -> None:
    crew = Crew()
    crew.reserve()
    crew.reserve()
    crew.idle = 1
    assert crew.awake == 1


def test_started_forgets_threads_that_have_ended() -> None:
    crew = Crew()
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    crew.started(ended)
    current = threading.current_thread()
    crew.started(current)
    assert crew.threads == [current]
