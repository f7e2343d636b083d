"""Flask-Security-Too with SQLAlchemy: its login view, identified to Koala.

Flask-Security signs users in with Flask-Login's ``login_user``, so ``Koala(app)`` covers
its login, remember-me and (with ``SECURITY_REGISTERABLE``) the login after a sign-up
without any further wiring. The database here is SQLite in memory.
"""

from __future__ import annotations

from typing import Any, Optional

from flask import Flask
from flask_security import Security, SQLAlchemyUserDatastore, hash_password
from flask_security.models import fsqla_v3 as fsqla
from flask_sqlalchemy import SQLAlchemy

from flask_koala import Koala

db = SQLAlchemy()
fsqla.FsModels.set_db_info(db)
security = Security()
koala = Koala()


class Role(db.Model, fsqla.FsRoleMixin):  # type: ignore[name-defined]
    pass


class User(db.Model, fsqla.FsUserMixin):  # type: ignore[name-defined]
    pass


@koala.identity_loader
def koala_traits(user: User) -> dict[str, Any]:
    return {"email": user.email, "confirmed": user.confirmed_at is not None}


def create_app(config: Optional[dict[str, Any]] = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        SECRET_KEY="change-me",
        SECURITY_PASSWORD_SALT="change-me-too",
        SECURITY_PASSWORD_HASH="pbkdf2_sha512",
        SQLALCHEMY_DATABASE_URI="sqlite://",
        KOALA_PUBLIC_KEY="pk_example",
        KOALA_API_URL="http://127.0.0.1:8787",
    )
    app.config.update(config or {})
    db.init_app(app)
    security.init_app(app, SQLAlchemyUserDatastore(db, User, Role))
    koala.init_app(app)
    with app.app_context():
        db.create_all()
        if not security.datastore.find_user(email="jane@example.com"):
            security.datastore.create_user(
                email="jane@example.com", password=hash_password("correct horse")
            )
            db.session.commit()
    return app
