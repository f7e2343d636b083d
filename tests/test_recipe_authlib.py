"""The Authlib recipe signs in against a local OIDC provider and identifies on both sides."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask import Flask

from examples.recipes import authlib_login
from flask_koala._receiver import KoalaReceiver

from .oauth_provider import CLIENT_ID, CLIENT_SECRET, LocalProvider
from .support import PROFILE_ID


# Module-wide: Authlib's OAuth registry keeps the first app's provider metadata for later apps.
@pytest.fixture(scope="module")
def provider() -> Iterator[LocalProvider]:
    with LocalProvider() as provider:
        yield provider


@pytest.fixture
def recipe_app(provider: LocalProvider, receiver: KoalaReceiver) -> Iterator[Flask]:
    app = authlib_login.create_app(
        {
            "TESTING": True,
            "KOALA_SUPPRESS_SEND": False,
            "KOALA_API_URL": receiver.url,
            "IDP_SERVER_METADATA_URL": f"{provider.url}/.well-known/openid-configuration",
            "IDP_CLIENT_ID": CLIENT_ID,
            "IDP_CLIENT_SECRET": CLIENT_SECRET,
        }
    )
    yield app
    with app.app_context():
        authlib_login.koala.shutdown(5)


def sign_in(app: Flask) -> Any:
    """The browser's round trip: the app, the provider's authorize page, the callback."""
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    to_provider = client.get("/login").headers["Location"]
    back = requests.get(to_provider, allow_redirects=False, timeout=10).headers["Location"]
    assert back.startswith("http://localhost/callback?")
    response = client.get(back.removeprefix("http://localhost"))
    return client, response


def test_callback_identifies_the_provider_user(recipe_app: Flask, receiver: KoalaReceiver) -> None:
    _, response = sign_in(recipe_app)

    assert response.status_code == 302
    with recipe_app.app_context():
        assert authlib_login.koala.flush(5)
    (body,) = receiver.bodies
    assert (body["email"], body["profile_id"]) == ("sam@example.com", PROFILE_ID)
    assert body["identifies"][0]["traits"]["name"] == "Sam Provider"
    assert receiver.violations == []


def test_page_after_the_callback_queues_ko_identify(recipe_app: Flask) -> None:
    client, _ = sign_in(recipe_app)

    page = client.get("/").get_data(as_text=True)

    assert 'ko.identify("sam@example.com"' in page


def test_page_before_signing_in_has_no_identify(recipe_app: Flask) -> None:
    page = recipe_app.test_client().get("/").get_data(as_text=True)

    assert "koala" in page
    assert "ko.identify(" not in page
