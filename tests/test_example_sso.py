"""``examples/sso_callback.py`` end to end against the loopback receiver."""

from __future__ import annotations

import http.cookiejar
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Flask

from examples import sso_callback
from flask_koala._ids import parse_profile_id
from flask_koala._receiver import KoalaReceiver

from .support import PROFILE_ID, delivered, free_port, wait

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def make_example(receiver: KoalaReceiver) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        app = sso_callback.create_app({"KOALA_API_URL": receiver.url, **config})
        apps.append(app)
        return app

    yield make
    for app in apps:
        with app.app_context():
            sso_callback.koala.shutdown(5)


def test_sign_in_identifies_the_visitor(
    make_example: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_example(KOALA_MISSING_COOKIE="skip")
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    page = client.get("/login?user=ada", follow_redirects=True)
    assert "Signed in as ada@example.com" in page.get_data(as_text=True)
    assert PROFILE_ID in page.get_data(as_text=True)
    (body,) = delivered(app, receiver, sso_callback.koala)
    assert body["profile_id"] == PROFILE_ID
    traits = body["identifies"][0]["traits"]
    assert traits == {"email": "ada@example.com", "name": "Ada Lovelace"}


def test_sign_in_without_a_cookie_mints_one(
    make_example: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_example()  # the example's own default: mint
    client = app.test_client()
    client.get("/login?user=grace", follow_redirects=True)
    cookie = client.get_cookie("ko_id")
    assert cookie is not None
    assert parse_profile_id(cookie.value) == cookie.value
    (body,) = delivered(app, receiver, sso_callback.koala)
    assert (body["profile_id"], body["email"]) == (cookie.value, "grace@example.com")


def test_forged_state_is_refused_and_sends_nothing(
    make_example: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_example()
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.get("/login?user=ada")  # starts a sign-in, sets the state
    response = client.get("/sso/callback?code=whatever&state=forged")
    assert response.status_code == 400
    assert delivered(app, receiver, sso_callback.koala) == []


def test_replayed_code_is_refused_and_sends_once(
    make_example: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_example()
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    callback = client.get("/idp/authorize?login_hint=ada&state=s1").headers["Location"]
    with client.session_transaction() as session:
        session["sso_state"] = "s1"
    assert client.get(callback).status_code == 302
    with client.session_transaction() as session:
        session["sso_state"] = "s1"
    assert client.get(callback).status_code == 401
    assert len(delivered(app, receiver, sso_callback.koala)) == 1


def test_unknown_user_is_refused_by_the_provider(make_example: Callable[..., Flask]) -> None:
    app = make_example()
    assert app.test_client().get("/login?user=mallory", follow_redirects=True).status_code == 403


def test_sign_out(make_example: Callable[..., Flask]) -> None:
    app = make_example()
    client = app.test_client()
    client.get("/login?user=ada", follow_redirects=True)
    page = client.post("/logout", follow_redirects=True)
    assert "Not signed in" in page.get_data(as_text=True)


def test_defaults_point_at_the_loopback_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOALA_API_URL", raising=False)
    app = sso_callback.create_app({"KOALA_SUPPRESS_SEND": True})
    with app.app_context():
        assert sso_callback.koala.config.api_url == "http://127.0.0.1:8787"
        assert sso_callback.koala.config.missing_cookie == "mint"


@pytest.mark.slow
def test_flask_cli_finds_the_app() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KOALA_API_URL": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "examples.sso_callback", "routes"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "/sso/callback" in result.stdout


@pytest.mark.slow
def test_python_dash_m_serves_a_real_sign_in(receiver: KoalaReceiver) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KOALA_API_URL": receiver.url}
    env["PORT"] = str(port)
    server = subprocess.Popen(
        [sys.executable, "-m", "examples.sso_callback"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(jar)
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # wait until it listens; how long it takes is not what is tested
            try:
                opener.open(f"{base}/", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        page = opener.open(f"{base}/login?user=ada", timeout=10).read().decode()
        assert "Signed in as ada@example.com" in page
        assert receiver.wait_for(1, timeout=10)
        minted = {cookie.name: cookie.value for cookie in jar}["ko_id"]
        assert receiver.bodies[0]["profile_id"] == minted
        assert receiver.violations == []
    finally:
        server.terminate()
        wait(server, 10)
