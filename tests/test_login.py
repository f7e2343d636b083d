"""End to end: a login through Flask-Login reaches the receiver as one identify."""

from __future__ import annotations

import re
import uuid
from typing import Any

from flask import Flask

from flask_koala import Koala, __version__
from flask_koala._receiver import KoalaReceiver

from .support import PROFILE_ID, koala_of

SENT_AT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def flush(app: Flask, timeout: float = 5) -> bool:
    with app.app_context():
        return koala_of(app).flush(timeout)


def test_login_delivers_one_identify(app: Flask, client: Any, receiver: KoalaReceiver) -> None:
    assert client.post("/login/jane").status_code == 200
    assert flush(app)
    assert len(receiver.calls) == 1
    call = receiver.calls[0]
    assert call.path == "/web/projects/pk_test/batch"
    assert call.status == 200
    assert receiver.violations == []


def test_login_body_matches_the_contract(app: Flask, client: Any, receiver: KoalaReceiver) -> None:
    client.post("/login/jane")
    flush(app)
    body = receiver.bodies[0]
    assert body["profile_id"] == PROFILE_ID
    assert body["email"] == "jane@example.com"
    (entry,) = body["identifies"]
    assert entry["type"] == "identify"
    assert entry["traits"] == {"email": "jane@example.com"}
    assert SENT_AT.match(entry["sent_at"])
    assert uuid.UUID(entry["message_id"]).version == 4


def test_login_headers(app: Flask, client: Any, receiver: KoalaReceiver) -> None:
    client.post("/login/jane")
    flush(app)
    headers = receiver.calls[0].headers
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == f"flask-koala/{__version__}"


def test_uppercase_cookie_is_sent_lowercase(app: Flask, receiver: KoalaReceiver) -> None:
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID.upper())
    client.post("/login/jane")
    flush(app)
    assert receiver.bodies[0]["profile_id"] == PROFILE_ID


def test_identity_loader_traits_are_sent(
    make_app: Any, koala: Koala, receiver: KoalaReceiver
) -> None:
    @koala.identity_loader
    def traits(user: Any) -> dict[str, Any]:
        return {"email": user.email, "name": user.name}

    app = make_app(koala=koala)
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/login/jane")
    flush(app)
    traits_sent = receiver.bodies[0]["identifies"][0]["traits"]
    assert traits_sent == {"email": "jane@example.com", "name": "Jane Doe"}
