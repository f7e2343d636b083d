"""The same login, sent for real to the loopback receiver, as it would reach Koala."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from examples.factory_app import create_app
from examples.factory_app.extensions import koala
from flask_koala.testing import KoalaReceiver

from .helpers import VISITOR, log_in


@pytest.fixture
def sending_app(koala_receiver: KoalaReceiver) -> Iterator[Flask]:
    app = create_app(
        {
            "TESTING": True,
            "KOALA_SUPPRESS_SEND": False,  # send after all...
            "KOALA_API_URL": koala_receiver.url,  # ...to the loopback receiver
            "KOALA_SYNC": True,  # before the request returns, so the test can assert
        }
    )
    yield app
    with app.app_context():
        koala.shutdown()


def client_of(app: Flask) -> Any:
    client = app.test_client()
    client.set_cookie("ko_id", VISITOR)
    return client


def test_login_reaches_koala(sending_app: Flask, koala_receiver: KoalaReceiver) -> None:
    log_in(client_of(sending_app))

    (body,) = koala_receiver.bodies
    assert body["email"] == "jane@example.com"
    assert koala_receiver.violations == []


def test_suspended_koala_fails_the_call_not_the_login(
    sending_app: Flask, koala_receiver: KoalaReceiver
) -> None:
    koala_receiver.suspend()  # answer 400 "Koala ingest suspended", as Koala's hosts do

    response = log_in(client_of(sending_app))

    assert response.status_code == 200
    with sending_app.app_context():
        assert koala.stats["failed"] == 1
