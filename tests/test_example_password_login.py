"""examples/password_login.py end to end, against the loopback receiver."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from examples.password_login import DEMO_EMAIL, DEMO_PASSWORD, create_app, koala
from flask_koala._receiver import KoalaReceiver

from .support import PROFILE_ID


@pytest.fixture
def example(receiver: KoalaReceiver) -> Any:
    app: Flask = create_app({"KOALA_API_URL": receiver.url})
    yield app
    with app.app_context():
        koala.shutdown(5)


def login(app: Flask, password: str = DEMO_PASSWORD) -> Any:
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    return client.post("/login", data={"email": DEMO_EMAIL, "password": password})


def test_login_sends_email_and_name(example: Flask, receiver: KoalaReceiver) -> None:
    assert login(example).status_code == 302
    assert receiver.wait_for(1)
    body = receiver.bodies[0]
    assert body["profile_id"] == PROFILE_ID
    assert body["identifies"][0]["traits"] == {"email": DEMO_EMAIL, "name": "Demo User"}


def test_wrong_password_sends_nothing(example: Flask, receiver: KoalaReceiver) -> None:
    assert login(example, "wrong").status_code == 401
    with example.app_context():
        assert koala.flush(5)
    assert receiver.calls == []


def test_index_renders_the_snippet(example: Flask) -> None:
    html = example.test_client().get("/").get_data(as_text=True)
    assert "data-flask-koala" in html
    assert "/v1/pk_demo/sdk.js" in html
