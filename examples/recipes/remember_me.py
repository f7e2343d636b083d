"""Remember-me: a returning visitor whose session ended is identified when Flask-Login
restores it from the remember-me cookie.

``login_user(user, remember=True)`` sets Flask-Login's ``remember_token`` cookie. When the
browser comes back after the session cookie is gone, Flask-Login loads the user from it and
sends ``user_loaded_from_cookie``; with ``KOALA_IDENTIFY_ON_REMEMBER`` (on by default)
flask-koala identifies that visit too.
"""

from __future__ import annotations

from typing import Any, Optional

from flask import Flask, request
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user

from flask_koala import Koala

koala = Koala()
login_manager = LoginManager()


class User(UserMixin):
    def __init__(self, email: str) -> None:
        self.id = self.email = email


USERS = {"jane@example.com": User("jane@example.com")}


@login_manager.user_loader
def load_user(user_id: str) -> Optional[User]:
    return USERS.get(user_id)


def create_app(config: Optional[dict[str, Any]] = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        SECRET_KEY="change-me",
        KOALA_PUBLIC_KEY="pk_example",
        KOALA_API_URL="http://127.0.0.1:8787",
        KOALA_IDENTIFY_ON_REMEMBER=True,  # the default: identify remember-me restores too
    )
    app.config.update(config or {})
    login_manager.init_app(app)
    koala.init_app(app)

    @app.post("/login")
    def login() -> Any:
        user = USERS.get(request.form["email"])
        if user is None:  # a real app checks the password too
            return "unknown user", 401
        login_user(user, remember=request.form.get("remember") == "on")
        return "welcome"

    @app.get("/account")
    @login_required
    def account() -> str:
        return f"signed in as {current_user.email}"

    return app
