"""``KOALA_MISSING_COOKIE``: skip, defer across requests, or mint a visitor id."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from http.cookies import SimpleCookie
from typing import Any, Callable

import pytest
from flask import Flask, jsonify
from flask_login import login_user

from flask_koala import ConfigError, Koala
from flask_koala._ids import parse_profile_id
from flask_koala._missing_cookie import COOKIE_MAX_AGE, MAX_DEFERRED, SESSION_KEY
from flask_koala._payload import format_sent_at
from flask_koala._receiver import KoalaReceiver

from .support import OTHER_PROFILE_ID, PROFILE_ID, USERS, User, delivered, flushed_stats, koala_of


def pending(client: Any) -> list[dict[str, Any]]:
    with client.session_transaction() as session:
        return list(session.get(SESSION_KEY, []))


# -- skip --------------------------------------------------------------------------------


def test_skip_is_the_default(make_app: Callable[..., Flask], receiver: KoalaReceiver) -> None:
    app = make_app()
    client = app.test_client()
    client.post("/login/jane")
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    assert delivered(app, receiver) == []
    assert flushed_stats(app)["skipped.no_cookie"] == 1
    assert client.get_cookie("ko_id").value == PROFILE_ID  # type: ignore[union-attr]


def test_skip_sets_no_cookie_and_keeps_nothing(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_MISSING_COOKIE": "skip"})
    client = app.test_client()
    response = client.post("/login/jane")
    assert "ko_id" not in response.headers.get("Set-Cookie", "")
    assert pending(client) == []


# -- defer -------------------------------------------------------------------------------


@pytest.fixture
def defer_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app({"KOALA_MISSING_COOKIE": "defer"})


def test_defer_sends_on_the_first_later_request_with_a_cookie(
    defer_app: Flask, receiver: KoalaReceiver
) -> None:
    client = defer_app.test_client()
    before = time.time()
    assert client.post("/login/jane").get_json() == {"ok": True}
    (entry,) = pending(client)
    assert set(entry) == {"email", "traits", "at", "id"}  # plain values only
    assert delivered(defer_app, receiver) == []
    assert flushed_stats(defer_app)["deferred"] == 1
    client.get("/whoami")  # the pixel has not run yet
    assert delivered(defer_app, receiver) == []

    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    (body,) = delivered(defer_app, receiver)
    assert body["profile_id"] == PROFILE_ID
    assert body["email"] == "jane@example.com"
    # sent_at is the login's time, not the later request's.
    assert format_sent_at(before) <= body["identifies"][0]["sent_at"]
    assert body["identifies"][0]["message_id"] == entry["id"]
    assert pending(client) == []


def test_defer_sends_once(defer_app: Flask, receiver: KoalaReceiver) -> None:
    client = defer_app.test_client()
    client.post("/login/jane")
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    client.get("/whoami")
    delivered(defer_app, receiver)
    assert len(receiver.message_ids()) == 1
    counts = flushed_stats(defer_app)
    assert (counts["deferred"], counts["queued"], counts["sent"]) == (1, 1, 1)


def test_defer_keeps_the_sent_at_of_the_login(defer_app: Flask, receiver: KoalaReceiver) -> None:
    client = defer_app.test_client()
    client.post("/login/jane")
    with client.session_transaction() as session:
        entries = session[SESSION_KEY]
        entries[0]["at"] = time.time() - 600
        session[SESSION_KEY] = entries
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    sent_at = delivered(defer_app, receiver)[0]["identifies"][0]["sent_at"]
    assert sent_at < format_sent_at(time.time() - 500)


def test_defer_keeps_traits(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    koala.identity_loader(lambda user: {"email": user.email, "name": user.name})
    app = make_app({"KOALA_MISSING_COOKIE": "defer"}, koala=koala)
    client = app.test_client()
    client.post("/login/jane")
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    traits = delivered(app, receiver)[0]["identifies"][0]["traits"]
    assert traits == {"email": "jane@example.com", "name": "Jane Doe"}


def test_defer_parks_a_datetime_trait_as_iso_text(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    # The request thread keeps a datetime as it is; the session can only take its text.
    when = datetime(2026, 11, 28, 12, 0, 0, 250000, tzinfo=timezone.utc)
    koala.identity_loader(lambda user: {"email": user.email, "since": when})
    app = make_app({"KOALA_MISSING_COOKIE": "defer"}, koala=koala)
    client = app.test_client()
    client.post("/login/jane")
    assert pending(client)[0]["traits"] == {"since": "2026-11-28T12:00:00.250000+00:00"}
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    traits = delivered(app, receiver)[0]["identifies"][0]["traits"]
    assert traits["since"] == "2026-11-28T12:00:00.250000+00:00"


def test_defer_leaves_large_traits_out_of_the_session(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    koala.identity_loader(lambda user: {"email": user.email, "bio": "x" * 2000})
    app = make_app({"KOALA_MISSING_COOKIE": "defer"}, koala=koala)
    client = app.test_client()
    client.post("/login/jane")
    assert flushed_stats(app)["deferred.without_traits"] == 1
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    traits = delivered(app, receiver)[0]["identifies"][0]["traits"]
    assert traits == {"email": "jane@example.com"}


def test_defer_forgets_after_max_age(defer_app: Flask, receiver: KoalaReceiver) -> None:
    client = defer_app.test_client()
    client.post("/login/jane")
    with client.session_transaction() as session:
        entries = session[SESSION_KEY]
        entries[0]["at"] = time.time() - 86_400 - 60
        session[SESSION_KEY] = entries
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    assert delivered(defer_app, receiver) == []
    assert flushed_stats(defer_app)["skipped.defer_expired"] == 1
    assert pending(client) == []


def test_defer_forgets_expired_entries_without_a_cookie_too(
    defer_app: Flask, receiver: KoalaReceiver
) -> None:
    client = defer_app.test_client()
    client.post("/login/jane")
    with client.session_transaction() as session:
        entries = session[SESSION_KEY]
        entries[0]["at"] = time.time() - 86_400 - 60
        session[SESSION_KEY] = entries
    client.get("/whoami")
    assert pending(client) == []
    assert flushed_stats(defer_app)["skipped.defer_expired"] == 1


def test_defer_max_age_accepts_a_timedelta(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app({"KOALA_MISSING_COOKIE": "defer", "KOALA_DEFER_MAX_AGE": timedelta(minutes=5)})
    client = app.test_client()
    client.post("/login/jane")
    with client.session_transaction() as session:
        entries = session[SESSION_KEY]
        entries[0]["at"] = time.time() - 6 * 60
        session[SESSION_KEY] = entries
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    assert delivered(app, receiver) == []
    assert flushed_stats(app)["skipped.defer_expired"] == 1


def test_defer_forgets_on_logout(defer_app: Flask, receiver: KoalaReceiver) -> None:
    client = defer_app.test_client()
    client.post("/login/jane")
    client.post("/logout")
    assert pending(client) == []
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    assert delivered(defer_app, receiver) == []
    assert flushed_stats(defer_app)["skipped.defer_cancelled"] == 1


def test_defer_keeps_one_entry_per_email(defer_app: Flask) -> None:
    client = defer_app.test_client()
    client.post("/login/jane")
    client.post("/login/jane")
    assert len(pending(client)) == 1
    counts = flushed_stats(defer_app)
    assert (counts["deferred"], counts["skipped.duplicate"]) == (1, 1)


def test_defer_keeps_a_bounded_number_of_entries(defer_app: Flask, receiver: KoalaReceiver) -> None:
    emails = [f"user{n}@example.com" for n in range(MAX_DEFERRED + 2)]
    for n, email in enumerate(emails):
        USERS[f"u{n}"] = User(f"u{n}", email)
    try:
        client = defer_app.test_client()
        for n in range(len(emails)):
            client.post(f"/login/u{n}")
        assert [entry["email"] for entry in pending(client)] == emails[-MAX_DEFERRED:]
        assert flushed_stats(defer_app)["skipped.defer_overflow"] == 2
        client.set_cookie("ko_id", PROFILE_ID)
        client.get("/whoami")
        sent = [body["email"] for body in delivered(defer_app, receiver)]
        assert sorted(sent) == sorted(emails[-MAX_DEFERRED:])
    finally:
        for n in range(len(emails)):
            del USERS[f"u{n}"]


def test_defer_session_stays_small(
    make_app: Callable[..., Flask], koala: Koala, receiver: KoalaReceiver
) -> None:
    koala.identity_loader(lambda user: {"email": user.email, "bio": "y" * 10_000})
    app = make_app({"KOALA_MISSING_COOKIE": "defer"}, koala=koala)
    client = app.test_client()
    response = client.post("/login/jane")
    cookie = SimpleCookie(response.headers["Set-Cookie"])
    assert len(cookie["session"].value) < 1024


def test_defer_also_covers_a_bad_cookie(defer_app: Flask, receiver: KoalaReceiver) -> None:
    client = defer_app.test_client()
    client.set_cookie("ko_id", "not-a-uuid")
    client.post("/login/jane")
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    assert delivered(defer_app, receiver)[0]["profile_id"] == PROFILE_ID


def test_defer_sends_right_away_when_the_cookie_is_there(
    defer_app: Flask, receiver: KoalaReceiver
) -> None:
    client = defer_app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/login/jane")
    delivered(defer_app, receiver)
    assert len(receiver.message_ids()) == 1
    assert flushed_stats(defer_app)["deferred"] == 0


def test_defer_does_not_take_an_explicit_bad_profile_id(defer_app: Flask) -> None:
    koala: Koala = koala_of(defer_app)
    with defer_app.test_request_context():
        assert koala.identify("jane@example.com", profile_id="nope") is False
    assert flushed_stats(defer_app)["skipped.bad_cookie"] == 1


def test_defer_outside_a_request_skips(defer_app: Flask) -> None:
    koala: Koala = koala_of(defer_app)
    with defer_app.app_context():
        assert koala.identify("jane@example.com") is False
    assert flushed_stats(defer_app)["skipped.no_cookie"] == 1


def test_defer_with_decorator_and_login_user_keeps_one_entry(
    defer_app: Flask, receiver: KoalaReceiver
) -> None:
    koala: Koala = koala_of(defer_app)

    @defer_app.post("/sso")
    @koala.identify_login
    def sso() -> Any:
        login_user(USERS["jane"])
        return jsonify(ok=True)

    client = defer_app.test_client()
    client.post("/sso")
    assert len(pending(client)) == 1
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    delivered(defer_app, receiver)
    assert len(receiver.message_ids()) == 1


def test_defer_and_a_login_with_the_cookie_in_one_request_send_once(
    defer_app: Flask, receiver: KoalaReceiver
) -> None:
    client = defer_app.test_client()
    client.post("/login/jane")
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/login/jane")  # the pending one goes first, the new login is the same
    delivered(defer_app, receiver)
    assert len(receiver.message_ids()) == 1
    assert flushed_stats(defer_app)["skipped.duplicate"] == 1


def test_defer_skips_entries_it_cannot_read(defer_app: Flask, receiver: KoalaReceiver) -> None:
    client = defer_app.test_client()
    client.post("/login/jane")
    with client.session_transaction() as session:
        session[SESSION_KEY] = [*session[SESSION_KEY], {"email": "x@example.com"}, "junk"]
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    delivered(defer_app, receiver)
    assert len(receiver.message_ids()) == 1
    assert flushed_stats(defer_app)["skipped.defer_invalid"] == 2


def add_to_session(client: Any, *entries: Any) -> None:
    with client.session_transaction() as session:
        session[SESSION_KEY] = [*session.get(SESSION_KEY, []), *entries]


def test_defer_drops_unreadable_entries_from_the_session(defer_app: Flask) -> None:
    client = defer_app.test_client()
    client.post("/login/jane")
    (entry,) = pending(client)
    add_to_session(client, {"email": "x@example.com"}, "junk")
    client.get("/whoami")  # no ko_id yet: the readable entry keeps waiting
    assert pending(client) == [entry]
    client.get("/whoami")
    assert flushed_stats(defer_app)["skipped.defer_invalid"] == 2  # counted once each


def test_defer_drops_unreadable_entries_when_it_parks_another(defer_app: Flask) -> None:
    client = defer_app.test_client()
    client.get("/whoami")  # a session cookie, so the hook reads the session
    add_to_session(client, {"email": "x@example.com"}, "junk")
    client.post("/login/jane")
    assert [entry["email"] for entry in pending(client)] == ["jane@example.com"]
    assert flushed_stats(defer_app)["skipped.defer_invalid"] == 2


@pytest.mark.parametrize("at", [1e20, -1.0, 10**12, True, float("inf"), "1700000000"])
def test_defer_entry_with_an_impossible_time_is_unreadable(
    defer_app: Flask, receiver: KoalaReceiver, at: Any
) -> None:
    client = defer_app.test_client()
    client.post("/login/jane")
    with client.session_transaction() as session:
        entries = session[SESSION_KEY]
        entries[0]["at"] = at
        session[SESSION_KEY] = entries
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/whoami")
    assert delivered(defer_app, receiver) == []
    counts = flushed_stats(defer_app)
    assert counts["skipped.defer_invalid"] == 1
    assert counts["failed"] == 0
    assert pending(client) == []


def test_defer_requires_a_secret_key(receiver: KoalaReceiver) -> None:
    app = Flask(__name__)
    app.config.update(KOALA_SUPPRESS_SEND=True, KOALA_MISSING_COOKIE="defer")
    with pytest.raises(ConfigError, match=r"KOALA_MISSING_COOKIE.*SECRET_KEY"):
        Koala(app)


def test_defer_hook_leaves_requests_without_a_session_alone(receiver: KoalaReceiver) -> None:
    # Flask adds "Vary: Cookie" to responses whose session was read; a hook that runs on
    # every request must not make every anonymous response uncacheable. (Flask-Login reads
    # the session on its own, so this app has none.)
    app = Flask(__name__)
    app.config.update(SECRET_KEY="s", KOALA_SUPPRESS_SEND=True, KOALA_MISSING_COOKIE="defer")
    Koala(app)

    @app.get("/page")
    def page() -> str:
        return "ok"

    response = app.test_client().get("/page")
    assert "Cookie" not in response.headers.get("Vary", "")


# -- mint --------------------------------------------------------------------------------


def set_cookie_attributes(response: Any, name: str = "ko_id") -> dict[str, str]:
    for header in response.headers.getlist("Set-Cookie"):
        parts = [part.strip() for part in header.split(";")]
        key, _, value = parts[0].partition("=")
        if key == name:
            attributes = {"value": value}
            for part in parts[1:]:
                attr, _, attr_value = part.partition("=")
                attributes[attr.lower()] = attr_value
            return attributes
    raise AssertionError(f"no {name} cookie set")


@pytest.fixture
def mint_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app({"KOALA_MISSING_COOKIE": "mint"})


def test_mint_sends_with_a_new_visitor_id_and_sets_it(
    mint_app: Flask, receiver: KoalaReceiver
) -> None:
    client = mint_app.test_client()
    response = client.post("/login/jane")
    minted = set_cookie_attributes(response)["value"]
    assert parse_profile_id(minted) == minted
    (body,) = delivered(mint_app, receiver)
    assert body["profile_id"] == minted
    assert client.get_cookie("ko_id").value == minted  # type: ignore[union-attr]


def test_mint_cookie_attributes_on_http(mint_app: Flask) -> None:
    attributes = set_cookie_attributes(mint_app.test_client().post("/login/jane"))
    assert attributes["path"] == "/"
    assert attributes["max-age"] == str(COOKIE_MAX_AGE) == "31536000"
    assert attributes["samesite"] == "Lax"
    assert "expires" in attributes
    assert "httponly" not in attributes
    assert "secure" not in attributes
    assert "domain" not in attributes


def test_mint_cookie_is_secure_on_https(mint_app: Flask) -> None:
    client = mint_app.test_client()
    response = client.post("/login/jane", base_url="https://app.example.com")
    attributes = set_cookie_attributes(response)
    assert "secure" in attributes
    assert "httponly" not in attributes
    assert attributes["samesite"] == "Lax"


def test_mint_cookie_uses_the_cookie_domain(make_app: Callable[..., Flask]) -> None:
    app = make_app({"KOALA_MISSING_COOKIE": "mint", "KOALA_COOKIE_DOMAIN": "example.com"})
    response = app.test_client().post("/login/jane", base_url="https://app.example.com")
    assert set_cookie_attributes(response)["domain"] == "example.com"


def test_mint_uses_the_configured_cookie_name(make_app: Callable[..., Flask]) -> None:
    app = make_app({"KOALA_MISSING_COOKIE": "mint", "KOALA_COOKIE_NAME": "visitor"})
    response = app.test_client().post("/login/jane")
    assert parse_profile_id(set_cookie_attributes(response, "visitor")["value"])


def test_mint_replaces_a_bad_cookie(mint_app: Flask, receiver: KoalaReceiver) -> None:
    client = mint_app.test_client()
    client.set_cookie("ko_id", "not-a-uuid")
    minted = set_cookie_attributes(client.post("/login/jane"))["value"]
    assert delivered(mint_app, receiver)[0]["profile_id"] == minted


def test_mint_leaves_a_valid_cookie_alone(mint_app: Flask, receiver: KoalaReceiver) -> None:
    client = mint_app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    response = client.post("/login/jane")
    assert "ko_id" not in response.headers.get("Set-Cookie", "")
    assert delivered(mint_app, receiver)[0]["profile_id"] == PROFILE_ID


def test_mint_from_the_decorator_after_the_view(mint_app: Flask, receiver: KoalaReceiver) -> None:
    koala: Koala = koala_of(mint_app)

    @mint_app.get("/sso")
    @koala.identify_login(get_user=lambda: "sam@example.com")
    def sso() -> Any:
        return jsonify(ok=True)

    response = mint_app.test_client().get("/sso")
    minted = set_cookie_attributes(response)["value"]
    assert delivered(mint_app, receiver)[0]["profile_id"] == minted


def test_mint_once_per_request(mint_app: Flask, receiver: KoalaReceiver) -> None:
    koala: Koala = koala_of(mint_app)

    @mint_app.post("/sso")
    @koala.identify_login
    def sso() -> Any:
        login_user(USERS["jane"])
        koala.identify("other@example.com")
        return jsonify(profile_id=koala.profile_id())

    response = mint_app.test_client().post("/sso")
    assert len(response.headers.getlist("Set-Cookie")) == 2  # the session and one ko_id
    minted = set_cookie_attributes(response)["value"]
    assert response.get_json() == {"profile_id": minted}
    bodies = delivered(mint_app, receiver)
    assert {body["profile_id"] for body in bodies} == {minted}
    assert sorted(body["email"] for body in bodies) == ["jane@example.com", "other@example.com"]
    assert flushed_stats(mint_app)["skipped.duplicate"] == 1


def test_mint_then_track_in_the_same_request_shares_the_id(
    mint_app: Flask, receiver: KoalaReceiver
) -> None:
    koala: Koala = koala_of(mint_app)

    @mint_app.post("/signup")
    def signup() -> Any:
        login_user(USERS["jane"])
        koala.track("Signed Up")
        return jsonify(ok=True)

    mint_app.test_client().post("/signup")
    bodies = delivered(mint_app, receiver)
    assert len(receiver.message_ids()) == 2  # the identify and the event
    assert len({body["profile_id"] for body in bodies}) == 1


def test_track_alone_does_not_mint(mint_app: Flask) -> None:
    koala: Koala = koala_of(mint_app)
    with mint_app.test_request_context():
        assert koala.track("Viewed Pricing") is False
    assert flushed_stats(mint_app)["skipped.no_cookie"] == 1


def test_mint_two_requests_mint_two_ids_without_a_cookie_jar(
    mint_app: Flask, receiver: KoalaReceiver
) -> None:
    first = set_cookie_attributes(mint_app.test_client().post("/login/jane"))["value"]
    second = set_cookie_attributes(mint_app.test_client().post("/login/jane"))["value"]
    assert first != second
    assert OTHER_PROFILE_ID not in (first, second)


def test_mint_from_an_async_view(mint_app: Flask, receiver: KoalaReceiver) -> None:
    koala: Koala = koala_of(mint_app)

    @mint_app.get("/sso")
    @koala.identify_login(get_user=lambda: "sam@example.com")
    async def sso() -> Any:
        return jsonify(ok=True)

    minted = set_cookie_attributes(mint_app.test_client().get("/sso"))["value"]
    assert delivered(mint_app, receiver)[0]["profile_id"] == minted
