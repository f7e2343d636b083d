"""No email, cookie value, key or password in any log line or in ``flask koala check``.

One run full of failures (a loader and a ``get_user`` that raise quoting the email,
answers that echo what was sent, plainly and URL-encoded, retries, a refused connection,
a signal receiver that raises), then every log record, traceback included, is searched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from flask import Flask, jsonify

from flask_koala import Koala, signals
from flask_koala._payload import clean_traits
from flask_koala._receiver import KoalaReceiver

from .support import PROFILE_ID, USERS, build_app, flushed_stats, koala_of, visitor

KEY = "pk_live_5ecret0key"
EMAIL = USERS["jane"].email  # jane@example.com
BAD_COOKIE = "c00kie-that-is-no-uuid"
# What must appear nowhere: the email and each half of it, the visitor ids, the key.
FORBIDDEN = ("jane@", "jane%40", "jane%2540", "@example.com", PROFILE_ID, BAD_COOKIE, KEY)


def echo(template: str) -> str:
    return template.format(
        email=EMAIL, quoted=EMAIL.replace("@", "%40"), twice=EMAIL.replace("@", "%2540")
    )


@pytest.fixture
def unreachable() -> Iterator[Flask]:
    """An app whose collector refuses every connection (port 1 on loopback)."""
    app = build_app(
        {"KOALA_PUBLIC_KEY": KEY, "KOALA_API_URL": "http://127.0.0.1:1", "KOALA_MAX_RETRIES": 1}
    )
    yield app
    with app.app_context():
        koala_of(app).shutdown(timeout=5)


def raise_quoting_the_email(*args: Any) -> Any:
    raise LookupError(f"no row for {EMAIL} (cookie {PROFILE_ID}, key {KEY})")


def every_log_line(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in records)


@pytest.mark.allow_errors
def test_a_run_full_of_failures_logs_no_email_cookie_or_key(
    make_app: Callable[..., Flask],
    receiver: KoalaReceiver,
    unreachable: Flask,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    koala = Koala()
    loader_raises = [True]

    @koala.identity_loader
    def traits(user: Any) -> dict[str, Any]:
        if loader_raises[0]:
            raise_quoting_the_email()
        return {"email": user.email, "name": "Jane"}

    app = make_app({"KOALA_PUBLIC_KEY": KEY, "KOALA_MAX_RETRIES": 1}, koala=koala)

    @app.post("/sso")
    @koala.identify_login(get_user=raise_quoting_the_email)
    def sso() -> Any:
        return jsonify(ok=True)

    def on_failed(sender: Flask, **extra: Any) -> None:
        raise_quoting_the_email()

    receiver.respond_with(400, body={"error": echo("no such user {quoted} ({email})")})
    receiver.respond_with(422, body=echo("invalid email: {twice} for " + PROFILE_ID))
    receiver.respond_with(503, 503, body=echo("overloaded by {email}, key " + KEY))
    with signals.call_failed.connected_to(on_failed, sender=app):
        browser = visitor(app)
        assert browser.post("/login/jane").status_code == 200  # the loader raises
        assert browser.post("/sso").status_code == 200  # get_user raises
        loader_raises[0] = False
        for _ in range(3):
            assert visitor(app).post("/login/jane").status_code == 200
        bad = app.test_client()
        bad.set_cookie("ko_id", BAD_COOKIE)
        assert bad.post("/login/jane").status_code == 200
        with app.app_context():
            koala.track("Renewed", email=EMAIL, profile_id=PROFILE_ID)
        counts = flushed_stats(app)
    assert visitor(unreachable).post("/login/jane").status_code == 200
    assert flushed_stats(unreachable)["failed"] == 1

    assert counts["skipped.loader_error"] == 2
    assert counts["skipped.bad_cookie"] == 1
    assert counts["failed"] >= 1  # calls about one person may share a request
    assert counts["failed"] + counts["sent"] == counts["queued"]
    text = every_log_line(caplog.records)
    assert [word for word in FORBIDDEN if word in text] == []
    assert "identity loader raised LookupError" in text
    assert "get_user raised LookupError" in text
    assert "call-failed signal raised LookupError" in text
    assert "HTTP 400" in text


def test_check_shows_no_key(make_app: Callable[..., Flask]) -> None:
    app = make_app({"KOALA_PUBLIC_KEY": KEY})
    result = app.test_cli_runner().invoke(args=["koala", "check"])
    assert result.exit_code == 0, result.output
    assert KEY not in result.output


PLAIN_KEY = "workspace42"  # a key need not start with pk_: any URL-safe key is accepted


@pytest.mark.parametrize(
    "answer",
    [f"no workspace at /web/projects/{PLAIN_KEY}/batch", f"unknown workspace {PLAIN_KEY}"],
)
def test_a_key_koala_echoes_is_masked_whatever_its_shape(
    make_app: Callable[..., Flask],
    receiver: KoalaReceiver,
    caplog: pytest.LogCaptureFixture,
    answer: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    app = make_app({"KOALA_PUBLIC_KEY": PLAIN_KEY})
    receiver.respond_with(404, body={"error": answer})

    assert visitor(app).post("/login/jane").status_code == 200
    assert flushed_stats(app)["failed"] == 1
    text = every_log_line(caplog.records)
    assert "HTTP 404" in text
    assert PLAIN_KEY not in text


def test_a_dropped_trait_is_named_without_the_email_its_key_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plain, _ = clean_traits({EMAIL: float("nan"), "plan": "pro"})

    assert plain == {"plan": "pro"}
    assert "dropped trait" in caplog.text
    assert not [s for s in FORBIDDEN if s in caplog.text]
