"""Every code block of docs/login-flows.md and docs/missing-cookie.md runs, as the text says."""

from __future__ import annotations

import re
import sys
import types
from typing import Any, Callable

import pytest
from flask import Flask

from flask_koala import Koala
from flask_koala._receiver import KoalaReceiver

from .support import PROFILE_ID, USERS, User, delivered, doc_section, visitor

DOC = doc_section("Every form of login", "Logins without a `ko_id` cookie")


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC, re.DOTALL)


class FakeProvider:
    """What the callback block calls ``provider``: a code exchange without network."""

    @staticmethod
    def exchange(code: str) -> dict[str, str] | None:
        return {"email": "sam@example.com", "name": "Sam"} if code == "good" else None


class Recorder(types.ModuleType):
    """Stands in for ``segment.analytics`` or ``rudderstack.analytics``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls: list[tuple[Any, ...]] = []

    def identify(self, user_id: str, traits: dict[str, Any]) -> None:
        self.calls.append(("identify", user_id, traits))

    def track(self, user_id: str, event: str, properties: dict[str, Any]) -> None:
        self.calls.append(("track", user_id, event, properties))


@pytest.fixture
def cdps(monkeypatch: pytest.MonkeyPatch) -> dict[str, Recorder]:
    recorders = {}
    for package in ("segment", "rudderstack"):
        parent = types.ModuleType(package)
        recorder = Recorder(f"{package}.analytics")
        parent.analytics = recorder  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, package, parent)
        monkeypatch.setitem(sys.modules, f"{package}.analytics", recorder)
        recorders[package] = recorder
    return recorders


@pytest.fixture
def doc_app(make_app: Callable[..., Flask], koala: Koala, cdps: dict[str, Recorder]) -> Flask:
    app = make_app(koala=koala)

    @app.login_manager.request_loader  # type: ignore[attr-defined]
    def from_header(req: Any) -> User | None:
        return USERS.get(req.headers.get("X-User", ""))

    namespace: dict[str, Any] = {
        "__name__": "readme",
        "app": app,
        "koala": koala,
        "provider": FakeProvider,
        "create_user": lambda form: USERS["jane"],
    }
    for code in blocks()[:5]:
        exec(compile(code, "docs/login-flows.md", "exec"), namespace)
    return app


def test_the_doc_has_the_blocks_this_test_runs() -> None:
    assert len(blocks()) == 6


def test_callback_block(doc_app: Flask, koala: Koala, receiver: KoalaReceiver) -> None:
    assert visitor(doc_app).get("/oauth/callback?code=good").status_code == 302
    traits = delivered(doc_app, receiver)[0]["identifies"][0]["traits"]
    assert traits == {"email": "sam@example.com", "name": "Sam"}


def test_callback_block_with_a_bad_code_sends_nothing(
    doc_app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    visitor(doc_app).get("/oauth/callback?code=bad")
    assert delivered(doc_app, receiver) == []


def test_bare_block(doc_app: Flask, koala: Koala, receiver: KoalaReceiver) -> None:
    response = visitor(doc_app).post("/api/session", headers={"X-User": "jane"})
    assert response.get_json() == {"user": "jane"}
    assert delivered(doc_app, receiver)[0]["email"] == "jane@example.com"


def test_track_block(doc_app: Flask, koala: Koala, receiver: KoalaReceiver) -> None:
    visitor(doc_app).post("/reports/export")
    (event,) = delivered(doc_app, receiver)[0]["events"]
    assert (event["event"], event["properties"]) == ("Exported Report", {"format": "csv"})


def test_segment_block(doc_app: Flask, cdps: dict[str, Recorder]) -> None:
    visitor(doc_app).post("/signup")
    identify, track = cdps["segment"].calls
    assert identify == ("identify", "jane", {"email": "jane@example.com", "profile_id": PROFILE_ID})
    assert track == ("track", "jane", "Signed Up", {"profile_id": PROFILE_ID})


def test_rudderstack_block(doc_app: Flask, cdps: dict[str, Recorder]) -> None:
    client = visitor(doc_app)
    client.post("/login/jane")
    client.post("/welcome")
    (identify,) = cdps["rudderstack"].calls
    assert identify == (
        "identify",
        "jane",
        {"email": "jane@example.com", "ko_profile_id": PROFILE_ID},
    )


def test_missing_cookie_block(receiver: KoalaReceiver) -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="s", KOALA_PUBLIC_KEY="pk_test", KOALA_API_URL=receiver.url)
    koala = Koala()
    exec(compile(blocks()[5], "docs/missing-cookie.md", "exec"), {"app": app, "koala": koala})
    with app.app_context():
        assert koala.config.missing_cookie == "defer"
        assert koala.config.defer_max_age == 6 * 60 * 60
        koala.shutdown(5)
