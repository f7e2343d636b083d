"""The public API of Koala: identify, stats, flush, signals, app factories."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from flask import Flask, request

from flask_koala import Koala, signals
from flask_koala._receiver import KoalaReceiver

from .support import OTHER_PROFILE_ID, PROFILE_ID, build_app, koala_of


def test_identify_accepts_and_delivers(app: Flask, koala: Koala, receiver: KoalaReceiver) -> None:
    with app.app_context():
        assert koala.identify("jane@example.com", {"plan": "pro"}, profile_id=PROFILE_ID)
        assert koala.flush(5)
    body = receiver.bodies[0]
    assert body["identifies"][0]["traits"] == {"plan": "pro", "email": "jane@example.com"}


def test_identify_email_wins_over_traits_email(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    with app.app_context():
        koala.identify("jane@example.com", {"email": "other@example.com"}, profile_id=PROFILE_ID)
        koala.flush(5)
    assert receiver.bodies[0]["identifies"][0]["traits"]["email"] == "jane@example.com"


def test_identify_reads_cookie_of_current_request(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    with app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"}):
        assert koala.identify("jane@example.com")
        koala.flush(5)
    assert receiver.bodies[0]["profile_id"] == PROFILE_ID


def test_identify_reads_the_cookie_the_request_has_already_parsed(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    # A real login has read request.cookies (the session did), and Werkzeug keeps them.
    with app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"}):
        assert request.cookies["ko_id"] == PROFILE_ID
        assert koala.identify("jane@example.com")
        koala.flush(5)
    assert receiver.bodies[0]["profile_id"] == PROFILE_ID


def test_identify_without_request_or_profile_id_is_skipped(app: Flask, koala: Koala) -> None:
    with app.app_context():
        assert koala.identify("jane@example.com") is False
        assert koala.stats["skipped.no_cookie"] == 1


def test_identify_with_bad_profile_id_is_skipped(app: Flask, koala: Koala) -> None:
    with app.app_context():
        assert koala.identify("jane@example.com", profile_id="nope") is False
        assert koala.stats["skipped.bad_cookie"] == 1


def test_outside_app_context_raises_with_advice(koala: Koala, app: Flask) -> None:
    with pytest.raises(RuntimeError, match="application context"):
        koala.identify("jane@example.com", profile_id=PROFILE_ID)


def test_app_never_initialised_raises_with_advice(koala: Koala) -> None:
    with Flask("other").app_context(), pytest.raises(RuntimeError, match="init_app"):
        _ = koala.stats


def test_stats_have_every_counter(app: Flask, koala: Koala) -> None:
    with app.app_context():
        stats = koala.stats
    for key in ("queued", "sent", "failed", "dropped", "skipped", "retried"):
        assert stats[key] == 0


def test_stats_are_read_only(app: Flask, koala: Koala) -> None:
    with app.app_context():
        stats = koala.stats
    with pytest.raises(TypeError):
        stats["sent"] = 5  # type: ignore[index]


def test_login_counts_queued_and_sent(app: Flask, koala: Koala, client: Any) -> None:
    client.post("/login/jane")
    with app.app_context():
        koala.flush(5)
        assert koala.stats["queued"] == 1
        assert koala.stats["sent"] == 1
        assert koala.stats["pending"] == 0


def test_sent_signal_carries_message_id_and_status(
    app: Flask, koala: Koala, client: Any, receiver: KoalaReceiver
) -> None:
    seen: list[dict[str, Any]] = []

    def on_sent(sender: Flask, **extra: Any) -> None:
        seen.append(extra)

    with signals.call_sent.connected_to(on_sent, sender=app):
        client.post("/login/jane")
        with app.app_context():
            koala.flush(5)
    assert len(seen) == 1
    assert seen[0]["status"] == 200
    assert seen[0]["message_id"] == receiver.message_ids()[0]
    assert seen[0]["kind"] == "identify"


def restored_session(app: Flask) -> Any:
    """A client whose session is restored from a remember-me cookie on its first request."""
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/login/jane?remember=1")
    remember = client.get_cookie("remember_token")
    assert remember is not None
    fresh = app.test_client()
    fresh.set_cookie("ko_id", PROFILE_ID)
    fresh.set_cookie("remember_token", remember.value)
    return fresh


def test_remember_me_restore_identifies_once(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    fresh = restored_session(app)
    fresh.get("/whoami")
    fresh.get("/whoami")
    with app.app_context():
        koala.flush(5)
    # The password login, then one remember-me restore; count calls, not requests, since
    # calls about one person waiting together share a request.
    assert len(receiver.message_ids()) == 2


def test_logged_in_session_request_does_not_identify(
    app: Flask, koala: Koala, client: Any, receiver: KoalaReceiver
) -> None:
    client.post("/login/jane")
    client.get("/whoami")
    client.get("/whoami")
    with app.app_context():
        koala.flush(5)
    assert len(receiver.bodies) == 1


def test_remember_off_ignores_cookie_restore(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_IDENTIFY_ON_REMEMBER": False})
    restored_session(app).get("/whoami")
    with app.app_context():
        koala_of(app).flush(5)
    assert len(receiver.bodies) == 1


def test_two_apps_deliver_to_their_own_key(make_app: Callable[..., Flask]) -> None:
    koala = Koala()
    with KoalaReceiver() as other:
        first = make_app({"KOALA_PUBLIC_KEY": "pk_first"}, koala=koala)
        second = make_app({"KOALA_PUBLIC_KEY": "pk_second", "KOALA_API_URL": other.url}, koala)
        for app, profile in ((first, PROFILE_ID), (second, OTHER_PROFILE_ID)):
            client = app.test_client()
            client.set_cookie("ko_id", profile)
            client.post("/login/jane")
            with app.app_context():
                assert koala.flush(5)
        with second.app_context():
            assert koala.stats["sent"] == 1
        assert [c.public_key for c in other.calls] == ["pk_second"]
    with first.app_context():
        assert koala.stats["sent"] == 1


def test_one_koala_serves_two_apps_with_separate_stats(make_app: Callable[..., Flask]) -> None:
    koala = Koala()
    first = make_app(koala=koala)
    second = make_app({"KOALA_ENABLED": False}, koala=koala)
    with first.app_context():
        koala.identify("jane@example.com", profile_id=PROFILE_ID)
        koala.flush(5)
        assert koala.stats["sent"] == 1
    with second.app_context():
        assert koala.stats["sent"] == 0


def test_extension_keeps_no_app(app: Flask, koala: Koala) -> None:
    assert not any(isinstance(v, Flask) for v in vars(koala).values())


def test_suppressed_records_and_opens_no_connection(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_SUPPRESS_SEND": True}, koala=koala)
    with app.app_context(), koala.record_calls() as calls:
        assert koala.identify("jane@example.com", profile_id=PROFILE_ID)
        assert koala.flush(1)
        assert koala.stats["suppressed"] == 1
    assert calls[0]["email"] == "jane@example.com"
    assert receiver.calls == []


def test_record_calls_in_sending_mode(app: Flask, koala: Koala, receiver: KoalaReceiver) -> None:
    with app.app_context(), koala.record_calls() as calls:
        koala.identify("jane@example.com", profile_id=PROFILE_ID)
        koala.flush(5)
    assert calls == receiver.bodies


def test_sync_delivers_before_returning(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_SYNC": True}, koala=koala)
    with app.app_context():
        assert koala.identify("jane@example.com", profile_id=PROFILE_ID)
    assert len(receiver.bodies) == 1


def test_profile_id_outside_an_app_context_is_none(koala: Koala, app: Flask) -> None:
    assert koala.profile_id() is None


def test_profile_id_on_an_app_of_another_instance_raises(koala: Koala, app: Flask) -> None:
    request = app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"})
    with request, pytest.raises(RuntimeError, match="another Koala instance"):
        Koala().profile_id()


def test_suppressed_calls_after_shutdown_are_dropped(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    app = make_app({"KOALA_SUPPRESS_SEND": True}, koala=koala)
    with app.app_context():
        koala.shutdown()
        assert koala.identify("jane@example.com", profile_id=PROFILE_ID) is False
        assert koala.stats["dropped.shutdown"] == 1


def test_init_app_after_first_request_changes_nothing(receiver: KoalaReceiver) -> None:
    app = Flask(__name__)
    app.config.update(KOALA_PUBLIC_KEY="pk_test", KOALA_API_URL=receiver.url)
    app.get("/")(lambda: "ok")
    app.test_client().get("/")

    with pytest.raises(RuntimeError, match="already handled a request"):
        Koala(app)
    assert "koala" not in app.extensions
    assert "koala" not in app.cli.commands


def test_too_large_identify_can_be_retried_in_the_same_request(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    with app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"}):
        assert not koala.identify("jane@example.com", {"notes": "x" * 40_000})
        assert koala.identify("jane@example.com", {"notes": "short"})
        assert koala.stats["skipped.too_large"] == 1
        assert koala.stats.get("skipped.duplicate", 0) == 0


def test_queue_full_identify_can_be_retried_in_the_same_request(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    app = make_app({"KOALA_MAX_QUEUE_SIZE": 1}, koala=koala)
    with app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"}):
        assert koala.identify("other@example.com")
        assert not koala.identify("jane@example.com")  # the queue holds one, unwoken
        assert koala.stats["dropped.queue_full"] == 1
        assert koala.flush(5)
        assert koala.identify("jane@example.com")
        assert koala.stats.get("skipped.duplicate", 0) == 0


def test_identify_of_the_same_person_twice_in_a_request_is_a_duplicate(
    app: Flask, koala: Koala
) -> None:
    with app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"}):
        assert koala.identify("jane@example.com")
        assert not koala.identify("jane@example.com")
        assert koala.stats["skipped.duplicate"] == 1


def test_identify_made_while_another_is_accepted_is_remembered_too(
    app: Flask, koala: Koala
) -> None:
    def identify_bob(sender: Any, email: str = "", **extra: Any) -> None:
        if email == "jane@example.com":
            koala.identify("bob@example.com")  # inside jane's submit, before it returns

    cookie = {"Cookie": f"ko_id={PROFILE_ID}"}
    with signals.call_accepted.connected_to(identify_bob), app.test_request_context(headers=cookie):
        assert koala.identify("jane@example.com")
        assert not koala.identify("bob@example.com")
        assert not koala.identify("jane@example.com")


def test_shutdown_reports_the_drops_its_warnings_held_back(
    make_app: Callable[..., Flask], koala: Koala, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app({"KOALA_MAX_QUEUE_SIZE": 1}, koala=koala)
    with app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"}):
        for n in range(5):
            koala.identify(f"user{n}@example.com")  # one held, unwoken; four dropped
    with app.app_context():
        koala.shutdown(5)
        dropped = koala.stats["dropped.queue_full"]
    reported = [
        int(r.getMessage().split("dropped ")[1].split(" ")[0])
        for r in caplog.records
        if "(queue_full)" in r.getMessage()
    ]
    assert (sum(reported), dropped) == (4, 4)


@pytest.mark.parametrize("config", [{}, {"KOALA_SYNC": True}, {"KOALA_SUPPRESS_SEND": True}])
@pytest.mark.parametrize("method", ["flush", "shutdown"])
def test_a_timeout_that_is_not_seconds_raises_type_error_in_every_mode(
    config: dict[str, Any], method: str
) -> None:
    app = build_app(config)
    with app.app_context(), pytest.raises(TypeError, match="timeout must be a number"):
        getattr(koala_of(app), method)("5")


@pytest.mark.allow_errors
@pytest.mark.parametrize("timeout", ["5", float("nan")])
@pytest.mark.parametrize("method", ["flush", "shutdown"])
def test_a_bad_timeout_inside_a_request_is_logged_and_answered_false(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture, method: str, timeout: object
) -> None:
    app = make_app()
    koala = koala_of(app)

    @app.get("/done")
    def done() -> Any:
        return {"waited": getattr(koala, method)(timeout)}

    response = app.test_client().get("/done")

    assert (response.status_code, response.get_json()) == (200, {"waited": False})
    assert f"{method}() was given a timeout that is not" in caplog.text
    with app.app_context():
        assert koala.identify("jane@example.com", profile_id=PROFILE_ID)  # not shut down


@pytest.mark.parametrize("method", ["flush", "shutdown"])
def test_a_nan_timeout_raises_type_error_rather_than_waiting_forever(method: str) -> None:
    app = build_app()
    with app.app_context(), pytest.raises(TypeError, match="not nan"):
        getattr(koala_of(app), method)(float("nan"))
