"""Inside a request, delivery starts only once the response has gone out."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import pytest
from flask import Flask, make_response
from werkzeug.middleware.proxy_fix import ProxyFix

from flask_koala import Koala
from flask_koala._hooks import _waking_after_response
from flask_koala._pipeline import WAKE_KEY
from flask_koala._receiver import KoalaReceiver

from .support import PROFILE_ID, koala_threads


@pytest.fixture
def slow_app(make_app: Callable[..., Flask], koala: Koala) -> Flask:
    app = make_app(koala=koala)
    app.config["PROPAGATE_EXCEPTIONS"] = True
    app.extensions["view_ended"] = []

    @app.post("/slow-login")
    def slow_login() -> Any:
        koala.identify("jane@example.com", profile_id=PROFILE_ID)
        time.sleep(0.3)  # the rest of a login view: queries, rendering
        app.extensions["view_ended"].append(time.monotonic())
        return "ok"

    @app.post("/broken-login")
    def broken_login() -> Any:
        koala.identify("jane@example.com", profile_id=PROFILE_ID)
        raise LookupError("the view failed after identifying")

    return app


def test_no_delivery_while_the_view_runs(slow_app: Flask, receiver: KoalaReceiver) -> None:
    with slow_app.test_client() as client:
        response = client.post("/slow-login")
        response.close()  # what a WSGI server does once the body is sent
    assert receiver.wait_for(1, timeout=5)
    (view_ended,) = slow_app.extensions["view_ended"]
    assert receiver.calls[0].received_at >= view_ended


def test_a_request_that_raised_still_wakes_the_workers(
    slow_app: Flask, receiver: KoalaReceiver
) -> None:
    client = slow_app.test_client()
    with pytest.raises(LookupError):
        client.post("/broken-login")
    assert receiver.wait_for(1, timeout=5)  # without flush(): teardown woke a worker


def test_calls_outside_a_request_wake_at_once(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    with app.app_context():
        koala.identify("jane@example.com", profile_id=PROFILE_ID)
    assert receiver.wait_for(1, timeout=5)


def test_a_login_starts_at_most_one_worker(make_app: Callable[..., Flask]) -> None:
    # Before, the first login started every one of KOALA_MAX_WORKERS threads itself.
    app = make_app({"KOALA_MAX_WORKERS": 50})
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/login/jane").close()
    assert len(koala_threads()) <= 1


def test_the_wake_adds_no_hook_that_every_request_would_run(app: Flask) -> None:
    # Flask runs every after_request and teardown_request function on every request, page
    # views included; the wake is a WSGI layer that a request queuing nothing barely touches.
    hooks = [*app.after_request_funcs.values(), *app.teardown_request_funcs.values()]
    assert not [f for funcs in hooks for f in funcs if f.__module__.startswith("flask_koala")]


def test_a_middleware_wrapped_around_the_app_later_keeps_the_wake(
    make_app: Callable[..., Flask], receiver: KoalaReceiver
) -> None:
    app = make_app()
    app.wsgi_app = ProxyFix(app.wsgi_app)  # type: ignore[method-assign]
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    client.post("/login/jane").close()
    assert receiver.wait_for(1, timeout=5)


def test_an_identifying_response_still_closes_the_apps_body(
    make_app: Callable[..., Flask], koala: Koala
) -> None:
    app = make_app(koala=koala)
    closed: list[bool] = []

    @app.post("/login-and-close")
    def login_and_close() -> Any:
        koala.identify("jane@example.com", profile_id=PROFILE_ID)
        response = make_response("ok")
        response.call_on_close(lambda: closed.append(True))
        return response

    app.test_client().post("/login-and-close").close()
    assert closed == [True]


class FailingClose:
    """A response body whose ``close()`` raises, as a buggy middleware's might."""

    def __iter__(self) -> Iterator[bytes]:
        return iter([b"ok"])

    def close(self) -> None:
        raise OSError("the body could not close")


class Woken:
    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


def test_the_workers_wake_even_when_the_apps_body_fails_to_close() -> None:
    dispatcher = Woken()

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ[WAKE_KEY].add(dispatcher)  # what the pipeline does for a queued call
        return FailingClose()

    body = _waking_after_response(wsgi_app)({}, None)  # type: ignore[arg-type]
    assert list(body) == [b"ok"]
    with pytest.raises(OSError, match="could not close"):
        body.close()  # type: ignore[attr-defined]
    assert dispatcher.wakes == 1
