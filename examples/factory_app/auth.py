"""Logging in and out: the views call Flask-Login, and flask-koala hears the login."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from flask import Blueprint, jsonify, request
from flask_login import (
    LoginManager,
    UserMixin,
    current_user,
    login_required,
    login_user,
    logout_user,
)

auth = Blueprint("auth", __name__)
login_manager = LoginManager()


@dataclass
class User(UserMixin):
    """A user; a real app would load it from its database and store a password hash."""

    id: str
    email: str
    password: str
    plan: str = "free"


USERS = {
    "jane@example.com": User("1", "jane@example.com", "secret", plan="pro"),
    "joe@example.com": User("2", "joe@example.com", "hunter2"),
}


@login_manager.user_loader
def load_user(user_id: str) -> Optional[User]:
    return next((user for user in USERS.values() if user.id == user_id), None)


@auth.post("/login")
def login() -> Any:
    user = USERS.get(request.form.get("email", ""))
    if user is None or user.password != request.form.get("password"):
        return jsonify(error="wrong email or password"), 401
    login_user(user, remember=request.form.get("remember") == "1")
    return jsonify(user=user.email)


@auth.post("/logout")
@login_required
def logout() -> Any:
    logout_user()
    return jsonify(ok=True)


@auth.get("/me")
def me() -> Any:
    return jsonify(user=getattr(current_user, "email", None))
