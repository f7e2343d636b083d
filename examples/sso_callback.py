"""An SSO sign-in whose callback never calls ``login_user``, identified with a decorator.

Many OAuth and SSO callbacks keep the signed-in user in the session themselves, so
Flask-Login's ``user_logged_in`` never fires. ``@koala.identify_login(get_user=get_user)`` covers
them: once the callback has answered below 400, ``get_user()`` says who signed in.

The identity provider is a fake inside this app, so nothing leaves the machine:
``/idp/authorize`` approves at once and sends the browser back to ``/sso/callback`` with a
one-time code, which the callback exchanges by calling :meth:`FakeIdentityProvider.exchange`
where a real app would call the provider's token endpoint.

Run it next to a loopback Koala receiver (``KOALA_API_URL``, default
``http://127.0.0.1:8787``)::

    python -m examples.sso_callback          # or: flask --app examples.sso_callback run

This demo has no Koala pixel to set ``ko_id``, so it mints one (``KOALA_MISSING_COOKIE =
"mint"``); set the environment variable to ``skip`` or ``defer`` to try the others.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Mapping
from typing import Any, Optional

from flask import Flask, abort, redirect, request, session, url_for
from markupsafe import escape

from flask_koala import Koala

koala = Koala()


class FakeIdentityProvider:
    """Stands in for Google, Okta or GitHub: approves anyone on the list, no network."""

    USERS: Mapping[str, Mapping[str, str]] = {
        "ada": {"email": "ada@example.com", "name": "Ada Lovelace"},
        "grace": {"email": "grace@example.com", "name": "Grace Hopper"},
    }

    def __init__(self) -> None:
        self._codes: dict[str, str] = {}
        self._lock = threading.Lock()

    def authorize(self, login_hint: str) -> Optional[str]:
        """A one-time code for a known user, as the provider's consent screen would issue."""
        if login_hint not in self.USERS:
            return None
        code = secrets.token_urlsafe(16)
        with self._lock:
            self._codes[code] = login_hint
        return code

    def exchange(self, code: str) -> Optional[dict[str, str]]:
        """The user info for a code, once: the provider's token and userinfo endpoints."""
        with self._lock:
            user_id = self._codes.pop(code, None)
        return None if user_id is None else dict(self.USERS[user_id])


def signed_in_user() -> Optional[dict[str, str]]:
    """Who the callback signed in: traits with ``"email"``, or ``None``."""
    user: Optional[dict[str, str]] = session.get("sso_user")
    return user


def create_app(config: Optional[Mapping[str, Any]] = None) -> Flask:
    """The app; ``config`` overrides what the environment says."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=os.environ.get("SECRET_KEY", "dev-only-not-secret"),
        KOALA_PUBLIC_KEY=os.environ.get("KOALA_PUBLIC_KEY", "pk_example"),
        KOALA_API_URL=os.environ.get("KOALA_API_URL", "http://127.0.0.1:8787"),
        KOALA_MISSING_COOKIE=os.environ.get("KOALA_MISSING_COOKIE", "mint"),
    )
    app.config.update(config or {})
    provider = FakeIdentityProvider()

    @app.get("/")
    def home() -> str:
        user = signed_in_user()
        if user is None:
            links = "".join(
                f'<li><a href="{url_for("login", user=name)}">Sign in as {name}</a></li>'
                for name in provider.USERS
            )
            return f"<p>Not signed in.</p><ul>{links}</ul>"
        return (
            f"<p>Signed in as {escape(user['email'])}; Koala visitor "
            f"{escape(koala.profile_id() or 'unknown')}.</p>"
            f'<form method="post" action="{url_for("logout")}"><button>Sign out</button></form>'
        )

    @app.get("/login")
    def login() -> Any:
        session["sso_state"] = state = secrets.token_urlsafe(16)
        return redirect(url_for("idp_authorize", login_hint=request.args["user"], state=state))

    @app.get("/idp/authorize")
    def idp_authorize() -> Any:
        """The fake provider's consent screen, approving at once."""
        code = provider.authorize(request.args.get("login_hint", ""))
        if code is None:
            abort(403)
        return redirect(url_for("sso_callback", code=code, state=request.args["state"]))

    @app.get("/sso/callback")
    @koala.identify_login(get_user=signed_in_user)
    def sso_callback() -> Any:
        """Finish the sign-in; identified to Koala only when this answers below 400."""
        if request.args.get("state") != session.pop("sso_state", None):
            abort(400)
        user = provider.exchange(request.args.get("code", ""))
        if user is None:
            abort(401)
        session["sso_user"] = user
        return redirect(url_for("home"))

    @app.post("/logout")
    def logout() -> Any:
        session.pop("sso_user", None)
        return redirect(url_for("home"))

    koala.init_app(app)
    return app


if __name__ == "__main__":
    create_app().run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")))
