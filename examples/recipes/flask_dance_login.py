"""Sign in through Flask-Dance, identified from its ``oauth_authorized`` signal.

Flask-Dance owns its callback view (``/login/idp/authorized``), so there is no view of
ours to decorate. Its ``oauth_authorized`` signal fires once the token is in; the handler
looks the user up and calls ``login_user``, and Flask-Login's ``user_logged_in`` makes
flask-koala identify them, as for a password login.

Settings: ``IDP_CLIENT_ID``, ``IDP_CLIENT_SECRET`` and the provider's ``IDP_BASE_URL``,
``IDP_AUTHORIZATION_URL`` and ``IDP_TOKEN_URL``.
"""

from __future__ import annotations

from typing import Any, Optional

from flask import Flask
from flask_dance.consumer import OAuth2ConsumerBlueprint, oauth_authorized
from flask_login import LoginManager, UserMixin, login_user

from flask_koala import Koala

koala = Koala()
login_manager = LoginManager()


class User(UserMixin):
    def __init__(self, email: str, name: Optional[str] = None) -> None:
        self.id = self.email = email
        self.name = name


USERS: dict[str, User] = {}


@login_manager.user_loader
def load_user(user_id: str) -> Optional[User]:
    return USERS.get(user_id)


def logged_in(blueprint: OAuth2ConsumerBlueprint, token: dict[str, Any]) -> None:
    """``oauth_authorized``: the provider said yes; sign the user in."""
    info = blueprint.session.get("userinfo").json()
    user = USERS.setdefault(info["email"], User(info["email"], info.get("name")))
    login_user(user)  # user_logged_in: flask-koala identifies the user


def make_blueprint() -> OAuth2ConsumerBlueprint:
    blueprint = OAuth2ConsumerBlueprint("idp", __name__, redirect_to="index")
    blueprint.from_config.update(
        client_id="IDP_CLIENT_ID",
        client_secret="IDP_CLIENT_SECRET",
        base_url="IDP_BASE_URL",
        authorization_url="IDP_AUTHORIZATION_URL",
        token_url="IDP_TOKEN_URL",
    )
    # A module-level receiver: blinker holds receivers weakly.
    oauth_authorized.connect(logged_in, sender=blueprint)
    return blueprint


def create_app(config: Optional[dict[str, Any]] = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        SECRET_KEY="change-me",
        KOALA_PUBLIC_KEY="pk_example",
        KOALA_API_URL="http://127.0.0.1:8787",
        IDP_CLIENT_ID="your-client-id",
        IDP_CLIENT_SECRET="your-client-secret",
        IDP_BASE_URL="https://idp.example.com/",
        IDP_AUTHORIZATION_URL="https://idp.example.com/authorize",
        IDP_TOKEN_URL="https://idp.example.com/token",
    )
    app.config.update(config or {})
    login_manager.init_app(app)
    koala.init_app(app)
    app.register_blueprint(make_blueprint(), url_prefix="/login")

    @app.get("/")
    def index() -> str:
        return "signed in"

    return app
