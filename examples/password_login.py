"""A single-file Flask app with a password login, identified to Koala on every login.

Run it against the loopback receiver (``make demo`` does both), or on its own:

    KOALA_PUBLIC_KEY=pk_... KOALA_API_URL=https://your-collector.example \\
        flask --app examples.password_login run

Without ``KOALA_API_URL`` it sends to the loopback receiver at http://127.0.0.1:8787, not to
flask-koala's default, Koala's own API, which currently answers every call 400 "Koala
ingest suspended".

The demo user is ``demo@example.com`` with the password ``koala``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from flask import Flask, abort, redirect, render_template, request
from flask_login import LoginManager, UserMixin, login_required, login_user, logout_user
from werkzeug.security import check_password_hash, generate_password_hash

from flask_koala import Koala

DEMO_EMAIL = "demo@example.com"
DEMO_PASSWORD = "koala"


class User(UserMixin):
    """A user of the demo; a real app would load this from its database."""

    def __init__(self, user_id: str, email: str, name: str, password: str) -> None:
        self.id = user_id
        self.email = email
        self.name = name
        self.password_hash = generate_password_hash(password)


USERS = {"1": User("1", DEMO_EMAIL, "Demo User", DEMO_PASSWORD)}
login_manager = LoginManager()
koala = Koala()


@login_manager.user_loader
def load_user(user_id: str) -> Optional[User]:
    return USERS.get(user_id)


@koala.identity_loader
def koala_traits(user: User) -> dict[str, Any]:
    """What Koala learns about a user who logs in: more than the default email."""
    return {"email": user.email, "name": user.name}


def create_app(config: Optional[dict[str, Any]] = None) -> Flask:
    """The app; settings come from ``config``, then ``KOALA_*`` environment variables."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=os.environ.get("SECRET_KEY", "dev-only-not-secret"),
        KOALA_PUBLIC_KEY=os.environ.get("KOALA_PUBLIC_KEY", "pk_demo"),
        KOALA_API_URL=os.environ.get("KOALA_API_URL", "http://127.0.0.1:8787"),
    )
    if os.environ.get("KOALA_SDK_URL"):
        app.config["KOALA_SDK_URL"] = os.environ["KOALA_SDK_URL"]
    app.config.update(config or {})
    login_manager.init_app(app)
    koala.init_app(app)

    @app.get("/")
    def index() -> str:
        return render_template("index.html", demo_email=DEMO_EMAIL, demo_password=DEMO_PASSWORD)

    @app.post("/login")
    def login() -> Any:
        email = request.form.get("email", "")
        user = next((u for u in USERS.values() if u.email == email), None)
        if user is None or not check_password_hash(
            user.password_hash, request.form.get("password", "")
        ):
            abort(401)
        # This is all it takes: Flask-Login's signal hands the login to flask-koala.
        login_user(user, remember=request.form.get("remember") == "on")
        return redirect("/")

    @app.post("/logout")
    @login_required
    def logout() -> Any:
        logout_user()
        return redirect("/")

    return app
