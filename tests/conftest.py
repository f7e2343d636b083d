"""Fixtures: a loopback Koala receiver, a Flask-Login app wired to it, child processes, and
three guards.

The guards make the suite strict where production code is lenient: flask-koala logs and
swallows every exception around user code and the network, so a test fails when such a
log line appears unexpectedly, when a delivery thread outlives its test, and when a child
process does (it is killed, so a hung child cannot keep the suite from finishing). Under CI
(the ``CI`` environment variable set, as ``.ci/run`` runs), a skipped test fails: CI runs
every test on every Python it covers, so a skip there hides a test that never ran.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Generator, Iterator
from typing import Any, Callable

import pytest
from flask import Flask

from flask_koala import Koala
from flask_koala._receiver import KoalaReceiver

from .support import (
    PROFILE_ID,
    Child,
    build_app,
    child_processes,
    kill_new_children,
    koala_of,
)

# pytester runs the testing plugin as a user's suite would; the plugin itself is used here too.
pytest_plugins = ["pytester", "flask_koala.testing"]


@pytest.fixture
def receiver() -> Iterator[KoalaReceiver]:
    with KoalaReceiver() as r:
        yield r


@pytest.fixture
def make_app(receiver: KoalaReceiver) -> Iterator[Callable[..., Flask]]:
    """Build apps aimed at the receiver; every one is shut down after the test."""
    apps: list[Flask] = []

    def make(config: dict[str, Any] | None = None, koala: Koala | None = None) -> Flask:
        merged = {"KOALA_API_URL": receiver.url, **(config or {})}
        app = build_app(merged, koala)
        apps.append(app)
        return app

    yield make
    for app in apps:
        with app.app_context():
            koala_of(app).shutdown(timeout=5)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    """Start a :class:`Child` (same arguments); any still running after the test is killed."""
    children: list[Child] = []

    def start(command: list[str], **options: Any) -> Child:
        children.append(Child(command, **options))
        return children[-1]

    yield start
    for child in children:
        child.stop(signal.SIGKILL)


@pytest.fixture
def koala() -> Koala:
    return Koala()


@pytest.fixture
def app(make_app: Callable[..., Flask], koala: Koala) -> Flask:
    return make_app(koala=koala)


@pytest.fixture
def client(app: Flask) -> Any:
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    return client


@pytest.fixture(autouse=True)
def _no_unexpected_errors(caplog: pytest.LogCaptureFixture, request: Any) -> Iterator[None]:
    """Fail a test in which flask-koala logged an error it did not expect."""
    caplog.set_level(logging.DEBUG, logger="flask_koala")
    yield
    if request.node.get_closest_marker("allow_errors"):
        return
    errors = [
        r
        for r in caplog.get_records("call")
        if r.name == "flask_koala" and r.levelno >= logging.ERROR
    ]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """No flask-koala delivery thread may outlive the test that started it."""
    yield
    for thread in threading.enumerate():
        if thread.name.startswith("flask-koala-"):
            thread.join(2)
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("flask-koala-")]
    assert not leaked, f"delivery threads left running: {leaked}"


@pytest.fixture(autouse=True)
def _no_leaked_processes() -> Iterator[None]:
    """No child process started by a test may outlive it; any left over is killed.

    Autouse, so it is set up before the test's other function fixtures and torn down after
    them: a process a fixture stops in its teardown is not counted, and one started by a
    wider-scoped fixture existed before and is left alone.
    """
    before = child_processes()
    yield
    leaked = kill_new_children(before, grace=5)
    assert not leaked, f"child processes left running (now killed): {leaked}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Under CI, a skip is a failure: a test that cannot run there must be fixed."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where every test must run: {reason}"
