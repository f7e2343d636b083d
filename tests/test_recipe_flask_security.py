"""The Flask-Security-Too recipe: its own login view identifies the user to Koala."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from importlib.metadata import version

import pytest
from flask import Flask

from flask_koala._receiver import KoalaReceiver

from .support import PROFILE_ID

if int(version("flask").split(".")[0]) < 3:
    # `make test-min` (Flask 2.3): the only Flask-Security-Too releases that accept Flask 2.3
    # import flask.Markup, which Flask 2.3 no longer has.
    pytest.skip("Flask-Security-Too needs Flask 3 in practice", allow_module_level=True)

with warnings.catch_warnings():
    # Flask-Security-Too on Python 3.9 may hash with passlib, which imports `crypt`.
    warnings.filterwarnings("ignore", "'crypt' is deprecated", DeprecationWarning)
    from examples.recipes import flask_security_app


@pytest.fixture
def recipe_app(receiver: KoalaReceiver) -> Iterator[Flask]:
    app = flask_security_app.create_app(
        {
            "TESTING": True,
            "WTF_CSRF_ENABLED": False,
            "KOALA_SUPPRESS_SEND": False,
            "KOALA_API_URL": receiver.url,
        }
    )
    yield app
    with app.app_context():
        flask_security_app.koala.shutdown(5)
        flask_security_app.db.session.remove()
        flask_security_app.db.engine.dispose()


def log_in(app: Flask, password: str) -> int:
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    response = client.post("/login", data={"email": "jane@example.com", "password": password})
    return response.status_code


def test_login_view_identifies(recipe_app: Flask, receiver: KoalaReceiver) -> None:
    assert log_in(recipe_app, "correct horse") == 302

    with recipe_app.app_context():
        assert flask_security_app.koala.flush(5)
    (body,) = receiver.bodies
    assert (body["email"], body["profile_id"]) == ("jane@example.com", PROFILE_ID)
    assert body["identifies"][0]["traits"]["confirmed"] is False
    assert receiver.violations == []


def test_wrong_password_identifies_nobody(recipe_app: Flask, receiver: KoalaReceiver) -> None:
    log_in(recipe_app, "wrong")

    with recipe_app.app_context():
        assert flask_security_app.koala.flush(5)
    assert receiver.bodies == []
