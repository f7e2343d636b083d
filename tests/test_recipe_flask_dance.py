"""The Flask-Dance recipe signs in against a local provider; ``oauth_authorized`` identifies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask import Flask

from examples.recipes import flask_dance_login
from flask_koala._receiver import KoalaReceiver

from .oauth_provider import CLIENT_ID, CLIENT_SECRET, LocalProvider
from .support import PROFILE_ID


@pytest.fixture
def provider() -> Iterator[LocalProvider]:
    with LocalProvider() as provider:
        yield provider


@pytest.fixture
def recipe_app(
    provider: LocalProvider, receiver: KoalaReceiver, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Flask]:
    # oauthlib refuses plain http, which the loopback provider speaks; never in production.
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    app = flask_dance_login.create_app(
        {
            "TESTING": True,
            "KOALA_SUPPRESS_SEND": False,
            "KOALA_API_URL": receiver.url,
            "IDP_CLIENT_ID": CLIENT_ID,
            "IDP_CLIENT_SECRET": CLIENT_SECRET,
            "IDP_BASE_URL": f"{provider.url}/",
            "IDP_AUTHORIZATION_URL": f"{provider.url}/authorize",
            "IDP_TOKEN_URL": f"{provider.url}/token",
        }
    )
    yield app
    with app.app_context():
        flask_dance_login.koala.shutdown(5)


def sign_in(app: Flask, cookie: bool = True) -> Any:
    client = app.test_client()
    if cookie:
        client.set_cookie("ko_id", PROFILE_ID)
    to_provider = client.get("/login/idp").headers["Location"]
    back = requests.get(to_provider, allow_redirects=False, timeout=10).headers["Location"]
    assert back.startswith("http://localhost/login/idp/authorized?")
    return client.get(back.removeprefix("http://localhost"))


def test_oauth_authorized_identifies_the_provider_user(
    recipe_app: Flask, receiver: KoalaReceiver
) -> None:
    response = sign_in(recipe_app)

    assert response.status_code == 302
    with recipe_app.app_context():
        assert flask_dance_login.koala.flush(5)
    (body,) = receiver.bodies
    assert (body["email"], body["profile_id"]) == ("sam@example.com", PROFILE_ID)
    assert receiver.violations == []


def test_sign_in_without_ko_id_is_skipped(recipe_app: Flask, receiver: KoalaReceiver) -> None:
    sign_in(recipe_app, cookie=False)

    with recipe_app.app_context():
        assert flask_dance_login.koala.flush(5)
        assert flask_dance_login.koala.stats["skipped.no_cookie"] == 1
    assert receiver.bodies == []
