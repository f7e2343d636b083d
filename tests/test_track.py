"""``koala.track`` and ``koala.profile_id``: server-side events and the visitor id for others."""

from __future__ import annotations

import uuid
from typing import Any, Callable

import pytest
from flask import Flask, jsonify, request
from flask_login import login_user

from flask_koala import Koala, signals
from flask_koala._receiver import KoalaReceiver

from .support import OTHER_PROFILE_ID, PROFILE_ID, USERS, delivered


def add_track_route(app: Flask, koala: Koala) -> None:
    @app.post("/track")
    def track() -> Any:
        body = request.get_json()
        accepted = koala.track(body["event"], body.get("properties"), email=body.get("email"))
        return jsonify(accepted=accepted)

    @app.get("/profile-id")
    def profile_id() -> Any:
        return jsonify(profile_id=koala.profile_id())


@pytest.fixture
def track_app(make_app: Callable[..., Flask], koala: Koala) -> Flask:
    app = make_app(koala=koala)
    add_track_route(app, koala)
    return app


def test_track_sends_an_event_with_the_request_cookie(
    track_app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    client = track_app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    response = client.post("/track", json={"event": "Exported Report", "properties": {"n": 3}})
    assert response.get_json() == {"accepted": True}
    (body,) = delivered(track_app, receiver)
    assert body["profile_id"] == PROFILE_ID
    assert "email" not in body  # nobody is logged in
    (event,) = body["events"]
    assert event["type"] == "track"
    assert event["event"] == "Exported Report"
    assert event["properties"] == {"n": 3}
    assert uuid.UUID(event["message_id"]).version == 4


def test_track_defaults_to_the_logged_in_users_email(
    track_app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    client = track_app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/login/jane")
    client.post("/track", json={"event": "Exported Report"})
    bodies = delivered(track_app, receiver)
    assert bodies[-1]["email"] == "jane@example.com"
    assert bodies[-1]["events"][0]["properties"] == {}


def test_track_email_comes_through_the_identity_loader(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    koala.identity_loader(lambda user: {"email": f"{user.id}@work.example.com"})
    app = make_app(koala=koala)
    add_track_route(app, koala)
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/login/jane")
    client.post("/track", json={"event": "Exported Report"})
    assert delivered(app, receiver)[-1]["email"] == "jane@work.example.com"


def login_then_track(app: Flask, koala: Koala) -> Any:
    add_track_route(app, koala)
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/login/jane")
    return client.post("/track", json={"event": "Exported Report"}).get_json()


def test_track_skips_a_user_the_identity_loader_excludes(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    koala.identity_loader(lambda user: None)

    app = make_app(koala=koala)

    assert login_then_track(app, koala) == {"accepted": False}
    with app.app_context():
        assert koala.stats["skipped.excluded"] == 2  # the login, then the track


@pytest.mark.allow_errors
def test_track_skips_a_user_whose_identity_loader_raises(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    @koala.identity_loader
    def broken(user: Any) -> dict[str, Any]:
        raise LookupError("no such tenant")

    app = make_app(koala=koala)

    assert login_then_track(app, koala) == {"accepted": False}
    with app.app_context():
        assert koala.stats["skipped.loader_error"] == 2


def test_track_skips_a_user_whose_loaded_email_is_not_a_string(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    koala.identity_loader(lambda user: {"email": 42})

    app = make_app(koala=koala)

    assert login_then_track(app, koala) == {"accepted": False}
    with app.app_context():
        assert koala.stats["skipped.bad_email"] == 2


def test_track_for_a_user_without_an_email_is_sent_with_the_visitor_id_alone(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    app = make_app(koala=koala)
    with app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"}):
        login_user(USERS["noemail"])
        assert koala.track("Exported Report")
    (body,) = delivered(app, receiver)
    assert "email" not in body


def test_track_with_explicit_email_and_profile_id_outside_a_request(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    with app.app_context():
        assert koala.track("Renewed", email="jane@example.com", profile_id=OTHER_PROFILE_ID)
    (body,) = delivered(app, receiver)
    assert body["profile_id"] == OTHER_PROFILE_ID
    assert body["email"] == "jane@example.com"


@pytest.mark.parametrize("event", ["", "   ", None, 42, "x" * 300])
def test_track_with_a_bad_event_name_is_skipped(app: Flask, koala: Koala, event: Any) -> None:
    with app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"}):
        assert koala.track(event) is False
        assert koala.stats["skipped.bad_event"] == 1


@pytest.mark.parametrize(
    ("cookie", "reason"), [(None, "no_cookie"), ("", "no_cookie"), ("nope", "bad_cookie")]
)
def test_track_without_a_usable_cookie_is_skipped(
    app: Flask, koala: Koala, cookie: str | None, reason: str
) -> None:
    headers = {} if cookie is None else {"Cookie": f"ko_id={cookie}"}
    with app.test_request_context(headers=headers):
        assert koala.track("Exported Report") is False
        assert koala.stats[f"skipped.{reason}"] == 1


def test_track_with_a_bad_email_is_skipped(app: Flask, koala: Koala) -> None:
    with app.app_context():
        assert koala.track("Renewed", email="not an email", profile_id=PROFILE_ID) is False
        assert koala.stats["skipped.bad_email"] == 1


def test_track_with_properties_that_are_not_a_mapping_is_skipped(app: Flask, koala: Koala) -> None:
    with app.app_context():
        assert koala.track("Renewed", ["a"], profile_id=PROFILE_ID) is False  # type: ignore[arg-type]
        assert koala.stats["skipped.bad_properties"] == 1


def test_track_skip_is_signalled_as_track(app: Flask, koala: Koala) -> None:
    seen: list[dict[str, Any]] = []

    def on_skip(sender: Flask, **extra: Any) -> None:
        seen.append(extra)

    with signals.call_skipped.connected_to(on_skip, sender=app), app.app_context():
        koala.track("")
    assert [(s["kind"], s["reason"]) for s in seen] == [("track", "bad_event")]


def test_track_works_without_flask_login(receiver: KoalaReceiver) -> None:
    koala = Koala()
    app = Flask(__name__)
    app.config.update(
        TESTING=True,
        KOALA_PUBLIC_KEY="pk_test",
        KOALA_SUPPRESS_SEND=False,
        KOALA_API_URL=receiver.url,
    )
    koala.init_app(app)
    try:
        with app.test_request_context(headers={"Cookie": f"ko_id={PROFILE_ID}"}):
            assert koala.track("Exported Report")
        assert "email" not in delivered(app, receiver, koala)[0]
    finally:
        with app.app_context():
            koala.shutdown(5)


def test_profile_id_is_the_validated_cookie(track_app: Flask) -> None:
    client = track_app.test_client()
    client.set_cookie("ko_id", PROFILE_ID.upper())
    assert client.get("/profile-id").get_json() == {"profile_id": PROFILE_ID}


@pytest.mark.parametrize("cookie", [None, "", "not-a-uuid", "x" * 4000])
def test_profile_id_is_none_without_a_usable_cookie(track_app: Flask, cookie: str | None) -> None:
    client = track_app.test_client()
    if cookie is not None:
        client.set_cookie("ko_id", cookie)
    assert client.get("/profile-id").get_json() == {"profile_id": None}


def test_profile_id_is_none_outside_a_request(app: Flask, koala: Koala) -> None:
    with app.app_context():
        assert koala.profile_id() is None


def test_profile_id_reads_the_configured_cookie_name(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    app = make_app({"KOALA_COOKIE_NAME": "visitor"}, koala=koala)
    with app.test_request_context(headers={"Cookie": f"visitor={PROFILE_ID}; ko_id=x"}):
        assert koala.profile_id() == PROFILE_ID


def test_login_in_a_view_then_track_in_the_same_request(
    track_app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    @track_app.post("/signup")
    def signup() -> Any:
        login_user(USERS["jane"])
        koala.track("Signed Up")
        return jsonify(ok=True)

    client = track_app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/signup")
    bodies = delivered(track_app, receiver)
    kinds = sorted(k for body in bodies for k in ("identifies", "events") if k in body)
    assert kinds == ["events", "identifies"]
    assert {body["email"] for body in bodies} == {"jane@example.com"}
