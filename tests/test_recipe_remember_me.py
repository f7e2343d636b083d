"""The remember-me recipe: a session restored from the remember-me cookie is identified."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from examples.recipes import remember_me
from flask_koala._receiver import KoalaReceiver

from .support import OTHER_PROFILE_ID, PROFILE_ID

# Flask-Login 0.6.3 stamps the remember-me cookie with datetime.utcnow(), deprecated on 3.12+.
pytestmark = pytest.mark.filterwarnings(
    "ignore:datetime.datetime.utcnow:DeprecationWarning:flask_login"
)


@pytest.fixture
def make_recipe_app(receiver: KoalaReceiver) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        base = {"TESTING": True, "KOALA_SUPPRESS_SEND": False, "KOALA_API_URL": receiver.url}
        app = remember_me.create_app({**base, **config})
        apps.append(app)
        return app

    yield make
    for app in apps:
        with app.app_context():
            remember_me.koala.shutdown(5)


@pytest.fixture
def recipe_app(make_recipe_app: Callable[..., Flask]) -> Flask:
    return make_recipe_app()


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


def test_restores_are_not_identified_when_turned_off(
    make_recipe_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_recipe_app(KOALA_IDENTIFY_ON_REMEMBER=False)

    returning_browser(app).get("/account")

    assert delivered_emails(app, receiver) == [("jane@example.com", PROFILE_ID)]
