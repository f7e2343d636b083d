"""The remember-me recipe: a session restored from the remember-me cookie is identified."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

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


def returning_browser(app: Flask) -> FlaskClient:
    """A browser that logged in with "remember me" and comes back after its session ended."""
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/login", data={"email": "jane@example.com", "remember": "on"})
    assert client.get_cookie("remember_token") is not None
    client.delete_cookie(app.config["SESSION_COOKIE_NAME"])
    client.set_cookie("ko_id", OTHER_PROFILE_ID)  # another device's pixel, say
    return client


def delivered_emails(app: Flask, receiver: KoalaReceiver) -> list[tuple[str, str]]:
    with app.app_context():
        assert remember_me.koala.flush(5)
    assert receiver.violations == []
    return sorted((body["email"], body["profile_id"]) for body in receiver.bodies)


def test_restored_session_is_identified(recipe_app: Flask, receiver: KoalaReceiver) -> None:
    assert returning_browser(recipe_app).get("/account").status_code == 200

    assert delivered_emails(recipe_app, receiver) == sorted(
        [("jane@example.com", PROFILE_ID), ("jane@example.com", OTHER_PROFILE_ID)]
    )


def test_restores_are_not_identified_when_turned_off(receiver: KoalaReceiver) -> None:
    app = remember_me.create_app(
        {
            "TESTING": True,
            "KOALA_SUPPRESS_SEND": False,
            "KOALA_API_URL": receiver.url,
            "KOALA_IDENTIFY_ON_REMEMBER": False,
        }
    )
    returning_browser(app).get("/account")

    try:
        assert delivered_emails(app, receiver) == [("jane@example.com", PROFILE_ID)]
    finally:
        with app.app_context():
            remember_me.koala.shutdown(5)
