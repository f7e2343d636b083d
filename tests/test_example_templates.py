"""The demo's templates render the pixel, the identify and the reset as the README says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask, redirect, render_template, request
from flask_login import LoginManager, UserMixin, login_user, logout_user

from flask_koala import Koala

TEMPLATES = Path(__file__).resolve().parent.parent / "examples" / "templates"


class Visitor(UserMixin):
    def __init__(self, email: str) -> None:
        self.id = email
        self.email = email


@pytest.fixture
def demo() -> Any:
    """An app shaped like the demo: POST /login with an email, POST /logout."""
    app = Flask(__name__, template_folder=str(TEMPLATES))
    app.config.update(SECRET_KEY="demo", KOALA_PUBLIC_KEY="pk_demo", KOALA_SUPPRESS_SEND=True)
    LoginManager(app).user_loader(Visitor)
    Koala(app)

    @app.get("/")
    def index() -> str:
        return render_template("index.html")

    @app.post("/login")
    def login() -> Any:
        login_user(Visitor(request.form["email"]))
        return redirect("/")

    @app.post("/logout")
    def logout() -> Any:
        logout_user()
        return redirect("/")

    return app.test_client()


def test_anonymous_index_loads_the_pixel(demo: Any) -> None:
    html = demo.get("/").get_data(as_text=True)
    assert "https://cdn.getkoala.com/v1/pk_demo/sdk.js" in html
    assert "ko.identify(" not in html
    assert 'action="/login"' in html


def test_signed_in_index_identifies(demo: Any) -> None:
    html = demo.post("/login", data={"email": "ada@example.com"}, follow_redirects=True).get_data(
        as_text=True
    )
    assert 'ko.identify("ada@example.com",{});' in html
    assert "Signed in as <strong>ada@example.com</strong>" in html


def test_index_after_sign_out_resets(demo: Any) -> None:
    demo.post("/login", data={"email": "ada@example.com"})
    html = demo.post("/logout", follow_redirects=True).get_data(as_text=True)
    assert "ko.ready(function(){ko.reset();});" in html
    assert "ko.identify(" not in html


def test_snippet_sits_in_head(demo: Any) -> None:
    html = demo.get("/").get_data(as_text=True)
    assert html.index("data-flask-koala") < html.index("</head>")
