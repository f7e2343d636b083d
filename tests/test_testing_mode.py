"""Testing modes: suppressed sending, ``record_calls()`` and synchronous delivery."""

from __future__ import annotations

import threading
from typing import Any, Callable

from flask import Flask

from flask_koala import Koala, signals
from flask_koala._receiver import KoalaReceiver

from .support import OTHER_PROFILE_ID, PROFILE_ID, koala_of, koala_threads


def log_in(app: Flask, profile_id: str = PROFILE_ID) -> None:
    client = app.test_client()
    client.set_cookie("ko_id", profile_id)
    client.post("/login/jane")


# -- KOALA_SUPPRESS_SEND --------------------------------------------------------------------


def test_a_testing_app_suppresses_sending_by_default(receiver: KoalaReceiver) -> None:
    app = Flask(__name__)
    app.config.update(TESTING=True, KOALA_API_URL=receiver.url)  # no public key needed
    koala = Koala(app)

    with app.app_context(), koala.record_calls() as calls:
        assert koala.identify("jane@example.com", profile_id=PROFILE_ID)
        assert koala.config.mode == "suppressed"
        assert koala.stats["suppressed"] == 1
    assert len(calls) == 1
    assert receiver.calls == []


def test_suppressed_starts_no_thread(make_app: Callable[..., Flask], koala: Koala) -> None:
    app = make_app({"KOALA_SUPPRESS_SEND": True}, koala=koala)

    with app.app_context():
        for _ in range(3):
            assert koala.identify("jane@example.com", profile_id=PROFILE_ID)

    assert koala_threads() == []


def test_suppressed_calls_are_still_validated(make_app: Callable[..., Flask], koala: Koala) -> None:
    app = make_app({"KOALA_SUPPRESS_SEND": True}, koala=koala)

    with app.app_context(), koala.record_calls() as calls:
        assert koala.identify("not an email", profile_id=PROFILE_ID) is False
        assert koala.stats["skipped.bad_email"] == 1
    assert calls == []


# -- record_calls() -------------------------------------------------------------------------


def test_record_calls_stops_at_the_end_of_the_block(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    app = make_app({"KOALA_SUPPRESS_SEND": True}, koala=koala)

    with app.app_context():
        with koala.record_calls() as calls:
            koala.identify("jane@example.com", profile_id=PROFILE_ID)
        koala.identify("joe@example.com", profile_id=OTHER_PROFILE_ID)

    assert [call["email"] for call in calls] == ["jane@example.com"]


def test_record_calls_outside_an_app_context_hears_the_instances_apps(
    make_app: Callable[..., Flask],
) -> None:
    koala, other = Koala(), Koala()
    first = make_app({"KOALA_SUPPRESS_SEND": True}, koala=koala)
    second = make_app({"KOALA_SUPPRESS_SEND": True}, koala=koala)
    elsewhere = make_app({"KOALA_SUPPRESS_SEND": True}, koala=other)

    with koala.record_calls() as calls:
        for app in (first, second, elsewhere):
            log_in(app)

    assert len(calls) == 2


def test_record_calls_hears_only_its_own_app(make_app: Callable[..., Flask]) -> None:
    koala = Koala()
    first = make_app({"KOALA_SUPPRESS_SEND": True}, koala=koala)
    second = make_app({"KOALA_SUPPRESS_SEND": True}, koala=koala)

    with first.app_context(), koala.record_calls() as calls:
        log_in(second)

    assert calls == []
    with second.app_context():
        assert koala.stats["suppressed"] == 1


def test_record_calls_records_track_calls(make_app: Callable[..., Flask], koala: Koala) -> None:
    app = make_app({"KOALA_SUPPRESS_SEND": True}, koala=koala)

    with app.app_context(), koala.record_calls() as calls:
        koala.track("Exported", {"rows": 3}, email="jane@example.com", profile_id=PROFILE_ID)

    (event,) = calls[0]["events"]
    assert (event["event"], event["properties"]) == ("Exported", {"rows": 3})


def test_record_calls_in_sync_mode_matches_what_was_sent(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_SYNC": True}, koala=koala)

    with app.app_context(), koala.record_calls() as calls:
        log_in(app)

    assert calls == receiver.bodies


# -- KOALA_SYNC -----------------------------------------------------------------------------


def test_sync_is_off_by_default(app: Flask, koala: Koala) -> None:
    with app.app_context():
        assert koala.config.sync is False
        assert koala.config.mode == "thread"


def test_sync_delivers_on_the_calling_thread(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_SYNC": True}, koala=koala)
    threads: list[threading.Thread] = []

    def on_sent(sender: Flask, **extra: Any) -> None:
        threads.append(threading.current_thread())

    with signals.call_sent.connected_to(on_sent, sender=app):
        log_in(app)

    assert threads == [threading.current_thread()]
    assert koala_threads() == []


def test_sync_counts_the_call_sent_when_the_request_returns(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    app = make_app({"KOALA_SYNC": True}, koala=koala)

    log_in(app)

    with app.app_context():
        assert koala.stats["sent"] == 1
        assert koala.stats["pending"] == 0


def test_testing_set_after_init_app_suppresses_sending(receiver: KoalaReceiver) -> None:
    # What many conftest.py fixtures do: the factory ran with TESTING off, then the fixture
    # turns it on. With KOALA_SUPPRESS_SEND unset, suppression follows app.testing live.
    app = Flask(__name__)
    app.config.update(KOALA_PUBLIC_KEY="pk_test", KOALA_API_URL=receiver.url)
    koala = Koala(app)
    app.config["TESTING"] = True

    with app.app_context():
        assert koala.identify("jane@example.com", profile_id=PROFILE_ID)
        assert koala.stats["suppressed"] == 1
        assert koala.flush(5)
        koala.shutdown(5)
    assert receiver.calls == []


def test_the_testing_attribute_set_after_init_app_suppresses_sending(
    receiver: KoalaReceiver,
) -> None:
    app = Flask(__name__)
    app.config.update(KOALA_PUBLIC_KEY="pk_test", KOALA_API_URL=receiver.url)
    koala = Koala(app)
    app.testing = True

    with app.app_context():
        assert koala.identify("jane@example.com", profile_id=PROFILE_ID)
        assert koala.stats["suppressed"] == 1
        koala.shutdown(5)


def test_testing_turned_off_later_sends_again(receiver: KoalaReceiver) -> None:
    app = Flask(__name__)
    app.config.update(TESTING=True, KOALA_PUBLIC_KEY="pk_test", KOALA_API_URL=receiver.url)
    koala = Koala(app)
    app.config["TESTING"] = False

    with app.app_context():
        assert koala.identify("jane@example.com", profile_id=PROFILE_ID)
        assert koala.flush(5)
        koala.shutdown(5)
    assert len(receiver.bodies) == 1


def test_explicit_suppress_send_false_ignores_testing(make_app: Callable[..., Flask]) -> None:
    app = make_app({"KOALA_SUPPRESS_SEND": False, "TESTING": True})
    koala = koala_of(app)

    with app.app_context():
        assert koala.identify("jane@example.com", profile_id=PROFILE_ID)
        assert koala.flush(5)
        assert koala.stats["sent"] == 1
