"""docs/browser.md: its logout view and its flask-talisman setup run as the page shows them."""

from __future__ import annotations

import re

import pytest
from flask import Flask, render_template_string
from flask_login import LoginManager, login_user

from flask_koala import Koala

from .support import USERS, doc_section

DOC = doc_section("The browser snippet: Koala's pixel and `ko.identify()`")
PAGE = "<head>{{ koala_script() }}</head>"


def block(starting: str) -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)```", DOC, re.S)
    (code,) = [b for b in blocks if starting in b]
    return code


def run(code: str, app: Flask, koala: Koala) -> None:
    from flask import redirect, session
    from flask_login import login_required, logout_user

    namespace = {
        "app": app,
        "koala": koala,
        "session": session,
        "redirect": redirect,
        "login_required": login_required,
        "logout_user": logout_user,
    }
    exec(compile(code, "docs/browser.md", "exec"), namespace)


def test_logout_view_that_empties_the_session_still_resets() -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="s", KOALA_PUBLIC_KEY="pk_test", KOALA_SUPPRESS_SEND=True)
    LoginManager(app).user_loader(USERS.get)
    koala = Koala(app)
    app.add_url_rule("/page", "page", lambda: render_template_string(PAGE))
    app.add_url_rule("/login/<user_id>", "login", log_in, methods=["POST"])
    run(block('@app.post("/logout")'), app, koala)
    client = app.test_client()
    client.post("/login/jane")

    client.post("/logout")

    page = client.get("/page").get_data(as_text=True)
    assert "ko.reset()" in page
    assert "ko.identify(" not in page


def log_in(user_id: str) -> str:
    login_user(USERS[user_id])
    return "ok"


def test_talisman_nonce_is_on_the_snippet() -> None:
    pytest.importorskip("flask_talisman")
    app = Flask(__name__)
    app.config.update(SECRET_KEY="s", KOALA_PUBLIC_KEY="pk_test", KOALA_SUPPRESS_SEND=True)
    app.config["TALISMAN_FORCE_HTTPS"] = False
    koala = Koala()
    code = block("Talisman(").replace(
        "Talisman(\n    app,", "Talisman(\n    app,\n    force_https=False,"
    )
    run(code, app, koala)
    app.add_url_rule("/page", "page", lambda: render_template_string(PAGE))

    response = app.test_client().get("/page")

    (nonce,) = re.findall(r"'nonce-([^']+)'", response.headers["Content-Security-Policy"])
    assert f'<script data-flask-koala nonce="{nonce}">' in response.get_data(as_text=True)


def test_page_blocks_run_here() -> None:
    assert block('@app.post("/logout")')
    assert block("Talisman(")
