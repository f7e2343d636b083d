"""The whole flask-koala setup a test suite needs: the plugin and an ``app`` fixture."""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient

from examples.factory_app import create_app

from .helpers import VISITOR

pytest_plugins = ["flask_koala.testing"]


@pytest.fixture
def app() -> Flask:
    # TESTING = True also suppresses sending: calls are recorded, never sent.
    return create_app({"TESTING": True})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    client = app.test_client()
    client.set_cookie("ko_id", VISITOR)  # what Koala's browser pixel would have set
    return client
