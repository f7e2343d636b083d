"""Every skip has its reason, and the login's response is unchanged by it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Callable

import pytest
from flask import Flask

from flask_koala import Koala, signals
from flask_koala._receiver import KoalaReceiver

from .support import PROFILE_ID, flushed_stats


def login(app: Flask, user: str = "jane", cookie: str | None = PROFILE_ID) -> Any:
    client = app.test_client()
    if cookie is not None:
        client.set_cookie("ko_id", cookie)
    return client.post(f"/login/{user}")


@pytest.mark.parametrize(
    ("user", "cookie", "reason"),
    [
        ("jane", None, "no_cookie"),
        ("jane", "", "no_cookie"),
        ("jane", "not-a-uuid", "bad_cookie"),
        ("jane", "x" * 4000, "bad_cookie"),
        ("noemail", PROFILE_ID, "no_email"),
        ("bademail", PROFILE_ID, "bad_email"),
    ],
)
def test_skip_reason_counted_and_login_unchanged(
    make_app: Callable[..., Flask],
    receiver: KoalaReceiver,
    user: str,
    cookie: str | None,
    reason: str,
) -> None:
    app = make_app()
    response = login(app, user, cookie)
    assert response.status_code == 200
    assert response.get_json() == {"ok": True}
    counts = flushed_stats(app)
    assert counts["skipped"] == 1
    assert counts[f"skipped.{reason}"] == 1
    assert receiver.calls == []


def test_skip_is_signalled(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    seen: list[dict[str, Any]] = []

    def on_skip(sender: Flask, **extra: Any) -> None:
        seen.append(extra)

    with signals.call_skipped.connected_to(on_skip, sender=app):
        login(app, cookie=None)
    assert [s["reason"] for s in seen] == ["no_cookie"]


def test_skip_logs_reason_at_debug_without_pii(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    login(app, cookie="not-a-uuid")
    messages = [r.getMessage() for r in caplog.records if r.name == "flask_koala"]
    assert any("bad_cookie" in m for m in messages)
    assert not any("jane@example.com" in m or "not-a-uuid" in m for m in messages)


def test_too_large_traits_are_skipped(make_app: Callable[..., Flask], koala: Koala) -> None:
    koala.identity_loader(lambda user: {"email": user.email, "bio": "x" * 40_000})
    app = make_app(koala=koala)
    assert login(app).status_code == 200
    assert flushed_stats(app)["skipped.too_large"] == 1


def test_loader_returning_non_mapping_is_bad_traits(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    koala.identity_loader(lambda user: ["jane@example.com"])
    app = make_app(koala=koala)
    login(app)
    assert flushed_stats(app)["skipped.bad_traits"] == 1


def test_loader_returning_none_excludes_the_user(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    koala.identity_loader(lambda user: None)
    app = make_app(koala=koala)
    login(app)
    assert flushed_stats(app)["skipped.excluded"] == 1


@pytest.mark.allow_errors
def test_loader_that_raises_does_not_break_the_login(
    make_app: Callable[..., Flask], koala: Koala, caplog: pytest.LogCaptureFixture
) -> None:
    @koala.identity_loader
    def broken(user: Any) -> dict[str, Any]:
        raise LookupError("database is down")

    app = make_app(koala=koala)
    response = login(app)
    assert response.status_code == 200
    assert flushed_stats(app)["skipped.loader_error"] == 1
    assert any("identity loader raised" in r.getMessage() for r in caplog.records)


def test_disabled_skips_without_threads(make_app: Callable[..., Flask]) -> None:
    app = make_app({"KOALA_ENABLED": False})
    assert login(app).status_code == 200
    assert flushed_stats(app)["skipped.disabled"] == 1


def test_disabled_identify_returns_false(make_app: Callable[..., Flask], koala: Koala) -> None:
    app = make_app({"KOALA_ENABLED": False}, koala=koala)
    with app.app_context():
        assert koala.identify("jane@example.com", profile_id=PROFILE_ID) is False


def test_identify_on_login_off(make_app: Callable[..., Flask], receiver: KoalaReceiver) -> None:
    app = make_app({"KOALA_IDENTIFY_ON_LOGIN": False})
    login(app)
    assert flushed_stats(app)["queued"] == 0


@pytest.mark.allow_errors
def test_loader_error_logs_type_and_place_never_the_message(
    make_app: Callable[..., Flask], koala: Koala, caplog: pytest.LogCaptureFixture
) -> None:
    @koala.identity_loader
    def broken(user: Any) -> dict[str, Any]:
        raise LookupError(f"no row for {user.email}")

    login(make_app(koala=koala))
    text = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    assert "LookupError" in text
    assert "broken" in text  # where it was raised
    assert "jane@example.com" not in text


class RaisingMapping(Mapping[str, Any]):
    """The app's own mapping type, whose every read raises with an email in the message."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError("jane@example.com")

    def get(self, key: str, default: Any = None) -> Any:
        raise KeyError("jane@example.com")

    def __iter__(self) -> Iterator[str]:
        raise KeyError("jane@example.com")

    def __len__(self) -> int:
        return 1


class RaisingEmail(str):
    """A str whose strip() raises: an error nothing in flask-koala expects."""

    def strip(self, chars: str | None = None) -> str:
        raise LookupError(f"no row for {str.__str__(self)}")


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)


def test_traits_whose_mapping_raises_are_skipped_as_bad_traits(
    make_app: Callable[..., Flask], koala: Koala, caplog: pytest.LogCaptureFixture
) -> None:
    koala.identity_loader(lambda user: RaisingMapping())
    app = make_app(koala=koala)
    assert login(app).status_code == 200
    assert flushed_stats(app, koala)["skipped.bad_traits"] == 1
    assert "jane@example.com" not in logged(caplog)


@pytest.mark.allow_errors
def test_an_unexpected_error_in_a_login_is_counted_and_logged_without_its_message(
    make_app: Callable[..., Flask], koala: Koala, caplog: pytest.LogCaptureFixture
) -> None:
    koala.identity_loader(lambda user: {"email": RaisingEmail(user.email)})
    app = make_app(koala=koala)
    assert login(app).status_code == 200
    assert flushed_stats(app, koala)["skipped.internal_error"] == 1
    text = logged(caplog)
    assert "identifying a login failed unexpectedly (LookupError at" in text
    assert "jane@example.com" not in text


@pytest.mark.allow_errors
def test_an_unexpected_error_in_identify_is_counted_and_logged_without_its_message(
    make_app: Callable[..., Flask], koala: Koala, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(koala=koala)
    with app.test_request_context():
        assert koala.identify(RaisingEmail("jane@example.com"), profile_id=PROFILE_ID) is False
    assert flushed_stats(app, koala)["skipped.internal_error"] == 1
    text = logged(caplog)
    assert "identify failed unexpectedly (LookupError at" in text
    assert "jane@example.com" not in text
