"""The remember-me recipe: a session restored from the remember-me cookie is identified."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask

from examples.recipes import remember_me
from flask_koala._receiver import KoalaReceiver

from .support import OTHER_PROFILE_ID, PROFILE_ID


@pytest.fixture
def recipe_app(receiver: KoalaReceiver) -> Iterator[Flask]:
    app = remember_me.create_app(
        {"TESTING": True, "KOALA_SUPPRESS_SEND": False, "KOALA_API_URL": receiver.url}
    )
    yield app
    with app.app_context():
        remember_me.koala.shutdown(5)


def remember_token(app: Flask) -> str:
    """Log in with "remember me" and return the cookie Flask-Login set for it."""
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/login", data={"email": "jane@example.com", "remember": "on"})
    cookie = client.get_cookie("remember_token")
    assert cookie is not None
    return cookie.value


def delivered_emails(app: Flask, receiver: KoalaReceiver) -> list[tuple[str, str]]:
    with app.app_context():
        assert remember_me.koala.flush(5)
    assert receiver.violations == []
    return [(body["email"], body["profile_id"]) for body in receiver.bodies]


def test_restored_session_is_identified(recipe_app: Flask, receiver: KoalaReceiver) -> None:
    token = remember_token(recipe_app)
    # The browser comes back another day: no session cookie, only the remember-me one.
    returning = recipe_app.test_client()
    returning.set_cookie("remember_token", token)
    returning.set_cookie("ko_id", OTHER_PROFILE_ID)

    assert returning.get("/account").status_code == 200

    assert delivered_emails(recipe_app, receiver) == [
        ("jane@example.com", PROFILE_ID),
        ("jane@example.com", OTHER_PROFILE_ID),
    ]


def test_restores_are_not_identified_when_turned_off(receiver: KoalaReceiver) -> None:
    app = remember_me.create_app(
        {
            "TESTING": True,
            "KOALA_SUPPRESS_SEND": False,
            "KOALA_API_URL": receiver.url,
            "KOALA_IDENTIFY_ON_REMEMBER": False,
        }
    )
    token = remember_token(app)
    returning = app.test_client()
    returning.set_cookie("remember_token", token)
    returning.set_cookie("ko_id", OTHER_PROFILE_ID)
    returning.get("/account")

    try:
        assert delivered_emails(app, receiver) == [("jane@example.com", PROFILE_ID)]
    finally:
        with app.app_context():
            remember_me.koala.shutdown(5)
