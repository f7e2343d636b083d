"""Sign in with an OAuth 2 / OpenID Connect provider through Authlib.

The app keeps the signed-in user in the session and never calls ``login_user``, so the
callback is decorated with ``@koala.identify_login(get_user=signed_in_user)``, and the page passes
the same getter to ``koala_script()`` for the browser-side ``ko.identify``.

Settings: ``IDP_SERVER_METADATA_URL`` (the provider's ``.well-known/openid-configuration``),
``IDP_CLIENT_ID`` and ``IDP_CLIENT_SECRET``, read by Authlib from the app's config.
"""

from __future__ import annotations

from typing import Any, Optional

from authlib.integrations.flask_client import OAuth
from flask import Blueprint, Flask, redirect, render_template_string, session, url_for

from flask_koala import Koala

koala = Koala()
oauth = OAuth()
oauth.register("idp", client_kwargs={"scope": "openid email profile"})
auth = Blueprint("auth", __name__)

PAGE = """<!doctype html>
<head>{{ koala_script(get_user=signed_in_user) }}</head>
<body>{{ (signed_in_user() or {}).get("email", "not signed in") }}</body>
"""


def signed_in_user() -> Optional[dict[str, Any]]:
    """Who signed in, for the callback's identify and for the page's ``ko.identify``."""
    return session.get("user")


@auth.get("/login")
def login() -> Any:
    return oauth.idp.authorize_redirect(url_for("auth.callback", _external=True))


@auth.get("/callback")
@koala.identify_login(get_user=signed_in_user)
def callback() -> Any:
    token = oauth.idp.authorize_access_token()
    info = oauth.idp.userinfo(token=token)
    session["user"] = {"email": info["email"], "name": info.get("name")}
    return redirect("/")


@auth.get("/")
def index() -> str:
    return render_template_string(PAGE)


def create_app(config: Optional[dict[str, Any]] = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        SECRET_KEY="change-me",
        KOALA_PUBLIC_KEY="pk_example",
        KOALA_API_URL="http://127.0.0.1:8787",
        IDP_SERVER_METADATA_URL="https://idp.example.com/.well-known/openid-configuration",
        IDP_CLIENT_ID="your-client-id",
        IDP_CLIENT_SECRET="your-client-secret",
    )
    app.config.update(config or {})
    oauth.init_app(app)
    koala.init_app(app)
    app.add_template_global(signed_in_user)
    app.register_blueprint(auth)
    return app
