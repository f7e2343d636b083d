"""A login identifies the user to Koala: asserted on the recorded calls, nothing sent."""

from __future__ import annotations

from typing import Any

from flask import Flask

from .helpers import VISITOR, log_in


def test_login_identifies_the_user(client: Any, koala_calls: list[dict[str, Any]]) -> None:
    log_in(client)

    assert len(koala_calls) == 1
    assert koala_calls[0]["email"] == "jane@example.com"
    assert koala_calls[0]["profile_id"] == VISITOR


def test_login_sends_the_plan_as_a_trait(client: Any, koala_calls: list[dict[str, Any]]) -> None:
    log_in(client)

    (identify,) = koala_calls[0]["identifies"]
    assert identify["traits"] == {"email": "jane@example.com", "plan": "pro"}


def test_failed_login_identifies_nobody(client: Any, koala_calls: list[dict[str, Any]]) -> None:
    response = log_in(client, password="wrong")

    assert response.status_code == 401
    assert koala_calls == []


def test_visitor_without_cookie_is_not_identified(
    app: Flask, koala_calls: list[dict[str, Any]]
) -> None:
    log_in(app.test_client())  # no ko_id cookie: the pixel never ran

    assert koala_calls == []


def test_tests_never_send(app: Flask) -> None:
    assert app.extensions["koala"].config.mode == "suppressed"
