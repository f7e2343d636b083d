"""The login app the benchmarks serve, in four variants that differ only in what a login sends.

- ``bare``: Flask-Login's ``login_user`` and nothing else.
- ``koala``: the same, with flask-koala initialised (an identify per login, off-thread).
- ``segment``: the same, with segment-analytics-python's ``identify`` on ``user_logged_in``.
- ``requests``: the same, with an inline ``requests.post`` to Koala on ``user_logged_in``,
  as Koala's own server-side pseudocode does.

Every variant sends the same traits about the same user, aimed at the loopback receiver
(``BENCH_KOALA_URL``) or, for Segment, at a loopback sink (``BENCH_SEGMENT_URL``). The
visitor id comes from the request's ``ko_id`` cookie, so a client that sends a fresh one per
login makes every identify about a new person and nothing can be merged.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

from flask import Flask, jsonify, request
from flask_login import LoginManager, UserMixin, login_user, user_logged_in

VARIANTS: tuple[str, ...] = ("bare", "koala", "segment", "requests")
#: A second server of the bare app: what two identical servers differ by is the noise floor.
CONTROL = "bare_again"
PUBLIC_KEY = "pk_bench"


class User(UserMixin):  # type: ignore[misc]
    """A Flask-Login user with what a real profile carries."""

    def __init__(self, user_id: str, email: str) -> None:
        self.id = user_id
        self.email = email
        self.name = "Jane Doe"
        self.plan = "growth"
        self.company = "Example Corp"
        self.seats = 25
        self.signed_up_at = datetime.datetime(2024, 3, 1, 9, 30, tzinfo=datetime.timezone.utc)


USER = User("1001", "jane@example.com")


def traits(user: User) -> dict[str, Any]:
    """The traits every variant sends: six, as a typical identify carries."""
    return {
        "email": user.email,
        "name": user.name,
        "plan": user.plan,
        "company": user.company,
        "seats": user.seats,
        "signed_up_at": user.signed_up_at,
    }


def koala_body(profile_id: str | None, user: User) -> dict[str, Any]:
    """One identify as Koala's batch endpoint takes it."""
    now = time.time()
    sent_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    plain = traits(user)
    plain["signed_up_at"] = user.signed_up_at.isoformat()
    return {
        "profile_id": profile_id,
        "email": user.email,
        "identifies": [{"type": "identify", "sent_at": sent_at, "traits": plain}],
    }


def build(
    variant: str, koala_url: str, segment_url: str = "", config: dict[str, Any] | None = None
) -> Flask:
    """A Flask app whose ``POST /login`` logs :data:`USER` in, in the given variant.

    ``config`` is applied before the extensions read it.

    Returns the app; ``app.extensions["bench_flush"]`` waits until what logins sent is out.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    app = Flask(f"bench_{variant}")
    app.config.update(
        SECRET_KEY="bench-secret",
        KOALA_PUBLIC_KEY=PUBLIC_KEY,
        KOALA_API_URL=koala_url,
    )
    app.config.update(config or {})
    login_manager = LoginManager(app)

    @login_manager.user_loader  # type: ignore[untyped-decorator]
    def load_user(user_id: str) -> User | None:
        return USER if user_id == USER.id else None

    @app.post("/login")
    def login() -> Any:
        login_user(USER)
        return jsonify(ok=True)

    app.extensions["bench_flush"] = lambda: True
    if variant == "koala":
        _with_koala(app)
    elif variant == "segment":
        _with_segment(app, segment_url)
    elif variant == "requests":
        _with_requests(app, koala_url)
    return app


def _with_koala(app: Flask) -> None:
    from flask_koala import Koala

    koala = Koala()

    @koala.identity_loader
    def identity(user: User) -> dict[str, Any]:
        return traits(user)

    koala.init_app(app)

    def flush() -> bool:
        with app.app_context():
            return koala.flush(timeout=60)

    app.extensions["bench_flush"] = flush
    app.extensions["bench_koala"] = koala


def _with_segment(app: Flask, segment_url: str) -> None:
    from segment.analytics import Client

    # Debug logging off (it logs every payload); few retries, so a failing sink cannot
    # turn into a retry storm; the default upload interval and batch size.
    client = Client("bench-write-key", host=segment_url, debug=False, max_retries=1)

    def identify(sender: Flask, user: User, **extra: Any) -> None:
        client.identify(user.id, traits(user), anonymous_id=request.cookies.get("ko_id"))

    user_logged_in.connect(identify, sender=app, weak=False)

    def flush() -> bool:
        client.flush()
        return True

    app.extensions["bench_flush"] = flush


def _with_requests(app: Flask, koala_url: str) -> None:
    import requests

    url = f"{koala_url}/web/projects/{PUBLIC_KEY}/batch"

    def identify(sender: Flask, user: User, **extra: Any) -> None:
        body = koala_body(request.cookies.get("ko_id"), user)
        requests.post(url, json=body, timeout=5)

    user_logged_in.connect(identify, sender=app, weak=False)


def create(variant: str) -> Flask:
    """The app for a WSGI server: URLs from ``BENCH_KOALA_URL`` and ``BENCH_SEGMENT_URL``.

    :data:`CONTROL` serves the bare app again.
    """
    koala_url, segment_url = os.environ["BENCH_KOALA_URL"], os.environ.get("BENCH_SEGMENT_URL", "")
    return build("bare" if variant == CONTROL else variant, koala_url, segment_url)
