"""Delivery against the loopback receiver when Koala misbehaves."""

from __future__ import annotations

import gc
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask

from flask_koala import Koala, TransportError
from flask_koala._receiver import KoalaReceiver

from .support import PROFILE_ID, koala_of, koala_threads


def person(n: int) -> str:
    return f"3f2504e0-4f89-41d3-9a0c-{n:012d}"


def identify_many(app: Flask, count: int) -> list[str]:
    """Accept ``count`` identifies about distinct people; return their message ids."""
    koala: Koala = koala_of(app)
    ids: list[str] = []
    with app.app_context(), koala.record_calls() as bodies:
        for n in range(count):
            assert koala.identify(f"user{n}@example.com", profile_id=person(n))
    for body in bodies:
        ids.extend(entry["message_id"] for entry in body["identifies"])
    return ids


def stats(app: Flask) -> dict[str, int]:
    with app.app_context():
        return dict(koala_of(app).stats)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def flush(app: Flask, timeout: float) -> bool:
    with app.app_context():
        return koala_of(app).flush(timeout)


def test_outage_then_recovery_delivers_each_call_once(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    # Full jitter fits seven tries (the default) inside a 2 s outage for about one call in
    # 6,000, which then fails as retries_exhausted (one run in 300 of this test; CI saw it).
    # Twenty-one tries cannot fit.
    app = make_app({"KOALA_MAX_RETRIES": 20})
    receiver.outage(2.0, status=503)
    ids = identify_many(app, 20)
    assert flush(app, 60)
    assert sorted(receiver.message_ids()) == sorted(ids)
    assert stats(app)["sent"] == 20
    assert stats(app)["retried"] > 0


def test_retry_keeps_the_message_id(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app()
    receiver.respond_with(503)
    (message_id,) = identify_many(app, 1)
    assert flush(app, 30)
    sent_ids = [c.body["identifies"][0]["message_id"] for c in receiver.calls]
    assert sent_ids == [message_id, message_id]


def test_retry_after_holds_every_worker_back(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_MAX_WORKERS": 4})
    receiver.respond_with(429, retry_after=1)
    identify_many(app, 1)
    assert wait_until(lambda: stats(app)["retried"] == 1)  # the 429 was read
    identify_many(app, 3)  # other people, other workers: they must wait too
    assert flush(app, 30)
    first, *later = receiver.calls
    assert first.status == 429
    assert len(later) == 4
    assert all(call.received_at - first.received_at >= 1.0 for call in later)


def test_suspended_ingest_fails_once_with_koalas_text(
    make_app: Callable[..., Flask], receiver: KoalaReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    receiver.suspend()
    identify_many(app, 3)
    assert flush(app, 30)
    assert len(receiver.calls) == 3  # exactly one attempt per call
    counts = stats(app)
    assert counts["failed"] == 3
    assert counts["failed.http_400"] == 3
    assert counts["retried"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per distinct status and text per minute
    assert "400" in warnings[0]
    assert "Koala ingest suspended" in warnings[0]


def test_failure_is_signalled_with_status_and_error(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    from flask_koala import signals

    app = make_app()
    receiver.suspend()
    seen: list[dict[str, Any]] = []
    with signals.call_failed.connected_to(lambda s, **kw: seen.append(kw), sender=app):
        identify_many(app, 1)
        flush(app, 30)
    assert seen[0]["status"] == 400
    assert seen[0]["reason"] == "http_400"
    assert seen[0]["error"] == "Koala ingest suspended"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_is_final(
    make_app: Callable[..., Flask], receiver: KoalaReceiver, status: int
) -> None:
    app = make_app()
    receiver.respond_with(status)
    identify_many(app, 1)
    assert flush(app, 30)
    assert len(receiver.calls) == 1
    assert stats(app)["failed"] == 1


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried(
    make_app: Callable[..., Flask], receiver: KoalaReceiver, status: int
) -> None:
    app = make_app()
    receiver.respond_with(status, retry_after=0)
    identify_many(app, 1)
    assert flush(app, 30)
    assert [c.status for c in receiver.calls] == [status, 200]


def test_connection_reset_is_retried(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app()
    receiver.drop_connections(1)
    identify_many(app, 1)
    assert flush(app, 30)
    assert len(receiver.bodies) == 1
    assert stats(app)["retried.connection_error"] == 1


def test_connection_reset_on_a_kept_alive_connection_is_retried_as_the_policy_says(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_MAX_WORKERS": 1, "KOALA_MAX_RETRIES": 1})
    identify_many(app, 1)
    assert flush(app, 30)  # the worker now holds a kept-alive connection
    receiver.drop_connections(10)
    with app.app_context():
        koala_of(app).identify("jane@example.com", profile_id=person(1))
    assert flush(app, 30)
    assert len(receiver.calls) == 1 + 2  # the warm-up, then one try and one retry
    counts = stats(app)
    assert counts["retried.connection_error"] == 1
    assert counts["failed.retries_exhausted"] == 1


def test_receiver_hanging_past_the_timeout_is_retried(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_TIMEOUT": 0.3})
    receiver.delay(2.0)
    identify_many(app, 1)
    assert receiver.wait_for_calls(1, timeout=5)
    receiver.delay(0)
    assert flush(app, 30)
    assert stats(app)["retried.timeout"] >= 1
    assert stats(app)["sent"] == 1


def test_shutdown_cuts_short_an_attempt_in_flight_and_leaves_no_thread(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_TIMEOUT": 30})
    receiver.delay(20)  # the collector holds its answer far past the shutdown's timeout
    identify_many(app, 1)
    assert receiver.wait_for_requests(1)  # the worker is inside its attempt

    with app.app_context():
        assert koala_of(app).shutdown(0.2) is False

    assert koala_threads() == []
    assert stats(app)["failed.shutdown"] == 1


def test_retries_exhausted_is_a_failure(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_MAX_RETRIES": 2})
    receiver.respond_with(503, 503, 503, retry_after=0)
    identify_many(app, 1)
    assert flush(app, 30)
    assert len(receiver.calls) == 3
    counts = stats(app)
    assert counts["failed.retries_exhausted"] == 1
    assert counts["retried"] == 2


def test_nothing_reaches_koala_when_the_queue_is_full(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_MAX_QUEUE_SIZE": 5, "KOALA_MAX_WORKERS": 1, "KOALA_TIMEOUT": 0.5})
    receiver.delay(5.0)
    client = app.test_client()
    for n in range(40):
        client.set_cookie("ko_id", person(n))
        assert client.post("/login/jane").status_code == 200
        client.post("/logout")
    counts = stats(app)
    assert counts["queued"] + counts["dropped"] == 40
    assert counts["dropped.queue_full"] >= 40 - 5 - 1
    assert counts["pending"] <= 5 + 1  # bounded: the queue plus the call in flight
    receiver.reset()


def test_login_through_the_engine_reaches_receiver(
    app: Flask, client: Any, receiver: KoalaReceiver
) -> None:
    client.post("/login/jane")
    assert flush(app, 10)
    assert receiver.bodies[0]["profile_id"] == PROFILE_ID


@pytest.mark.parametrize("status", [201, 202, 204])
def test_any_2xx_is_sent(
    make_app: Callable[..., Flask], receiver: KoalaReceiver, status: int
) -> None:
    app = make_app()
    receiver.respond_with(status)
    identify_many(app, 1)
    assert flush(app, 30)
    assert len(receiver.calls) == 1
    counts = stats(app)
    assert (counts["sent"], counts["retried"], counts["failed"]) == (1, 0, 0)


def test_koalas_error_text_is_redacted_in_the_warning_and_the_signal(
    make_app: Callable[..., Flask], receiver: KoalaReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    from flask_koala import signals

    app = make_app()
    receiver.respond_with(422, body={"error": f"bad email user0@example.com for {person(0)}"})
    seen: list[dict[str, Any]] = []
    with signals.call_failed.connected_to(lambda s, **kw: seen.append(kw), sender=app):
        identify_many(app, 1)
        assert flush(app, 30)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "user0@example.com" not in warning
    assert person(0) not in warning
    assert "HTTP 422" in warning
    assert "***@***" in warning
    assert seen[0]["error"] == "bad email ***@*** for <uuid>"


def test_a_partial_outage_does_not_stall_delivery(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    # Half of Koala's answers are 503 and each takes 20 ms. A call waiting for its retry
    # holds no worker, so the four workers keep delivering the others meanwhile.
    app = make_app({"KOALA_MAX_WORKERS": 4})
    rng = random.Random(11)
    receiver.respond_with(*[rng.choice((503, 200)) for _ in range(3000)])
    receiver.delay(0.02)
    ids = identify_many(app, 300)
    receiver.wait_for(300, timeout=8)
    delivered_in_time = len(receiver.bodies)
    receiver.reset()  # the outage ends; what is left goes through
    assert flush(app, 60)
    assert delivered_in_time >= 0.85 * 300
    delivered = receiver.message_ids()
    assert len(delivered) == len(set(delivered))  # each accepted once
    counts = stats(app)
    assert counts["sent"] + counts.get("failed.retries_exhausted", 0) == 300
    assert set(delivered) <= set(ids)
    assert counts["pending"] == 0


def socket_count() -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_discarded_apps_leave_no_threads_or_sockets(receiver: KoalaReceiver) -> None:
    from .support import build_app

    gc.collect()
    before = socket_count()
    for _n in range(60):
        app = build_app({"KOALA_API_URL": receiver.url})
        identify_many(app, 1)
        assert flush(app, 10)
    del app
    assert receiver.wait_for(60)

    def clean() -> bool:
        gc.collect()
        return not koala_threads() and socket_count() <= before + 2

    assert wait_until(clean, timeout=15)


def test_one_persons_large_calls_are_sent_in_bodies_within_the_limit(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    # While the first call is held by a slow collector, 19 more about the same person queue
    # up; merged into one request they would make a 60 KB body, which a strict collector
    # refuses (413). They leave in several bodies of at most 32 KiB instead.
    app = make_app({"KOALA_MAX_WORKERS": 1}, koala=koala)
    receiver.delay(0.3)
    with app.app_context():
        for _ in range(20):
            assert koala.identify("jane@example.com", {"notes": "x" * 3000}, profile_id=PROFILE_ID)
        assert koala.flush(20)
        assert koala.stats["sent"] == 20
    assert receiver.violations == []
    assert 3 <= len(receiver.bodies) < 20  # merged, but never over the limit


class RefusingTransport:
    """A custom transport (``Koala(transport_factory=...)``) that never gets an answer."""

    def __init__(self, retryable: bool) -> None:
        self.retryable = retryable
        self.posts = 0

    def post(self, url: str, body: bytes, headers: Any, timeout: Any) -> Any:
        self.posts += 1
        raise TransportError("connection_error", "no route", retryable=self.retryable)

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("retryable", "posts"), [(False, 1), (True, 2)])
def test_a_custom_transport_ends_calls_through_the_public_transport_error(
    make_app: Callable[..., Flask], retryable: bool, posts: int
) -> None:
    transport = RefusingTransport(retryable)
    app = make_app(
        {"KOALA_SYNC": True, "KOALA_MAX_RETRIES": 1},
        koala=Koala(transport_factory=lambda: transport),
    )
    with app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"}):
        koala_of(app).identify("jane@example.com")
    assert transport.posts == posts
    expected = "failed.connection_error" if not retryable else "failed.retries_exhausted"
    assert stats(app)[expected] == 1
