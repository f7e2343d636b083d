"""The ledger: counts, rate-limited warnings, and what it never logs."""

from __future__ import annotations

import logging

import pytest

from flask_koala._ledger import Ledger, Throttle, describe_error
from flask_koala._payload import Call

PROFILE_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"


def call() -> Call:
    return Call.identify(profile_id=PROFILE_ID, email="jane@example.com", traits={})


def test_throttle_remembers_a_bounded_number_of_causes() -> None:
    now = [0.0]
    throttle = Throttle(lambda: now[0])
    for n in range(10_000):
        throttle.allow(("failed", n))
    assert len(throttle._last) <= 256


def test_varying_error_text_warns_once_per_cause_within_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = Ledger(lambda: None, clock=lambda: 0.0)
    ledger.accepted(call())
    ledger.failed([call()], "http_400", status=400, error="Koala ingest suspended")
    ledger.failed([call()], "http_400", status=400, error="Koala ingest suspended")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_drops_held_back_are_reported_at_the_last_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = Ledger(lambda: None, clock=lambda: 0.0)
    for _ in range(4):
        ledger.dropped([call()], "queue_full", accepted=False)
    ledger.report_held()
    ledger.report_held()  # nothing more was held back
    assert [w.split(" since")[0] for w in warnings_in(caplog)] == [
        "flask-koala: dropped 1 call(s) (queue_full)",
        "flask-koala: dropped 3 call(s) (queue_full)",
    ]


def test_failures_held_back_are_reported_at_the_last_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = Ledger(lambda: None, clock=lambda: 0.0)
    for _ in range(3):
        ledger.failed([call()], "http_400", status=400, error="Koala ingest suspended")
    ledger.report_held()
    assert warnings_in(caplog)[1] == (
        "flask-koala: 2 call(s) failed (http_400): Koala answered HTTP 400: Koala ingest suspended"
    )


EMAIL = "jane.doe@example.com"
SECRETS = ("jane.doe", "example.com", PROFILE_ID, "pk_live123")


def collector_error() -> str:
    return f"bad profile {PROFILE_ID} for {EMAIL} and jane.doe%40example.com in pk_live123"


def failing_ledger(app: object) -> Ledger:
    ledger = Ledger(lambda: app, clock=lambda: 0.0)
    ledger.accepted(call())
    return ledger


def test_failed_warning_redacts_koalas_error_text(caplog: pytest.LogCaptureFixture) -> None:
    failing_ledger(None).failed([call()], "http_400", status=400, error=collector_error())
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "HTTP 400" in warning
    assert "***@***" in warning
    assert not [s for s in SECRETS if s in warning]


def test_call_failed_signal_carries_redacted_error() -> None:
    from flask import Flask

    from flask_koala import signals

    app = Flask(__name__)
    seen: list[dict[str, object]] = []

    def on_failed(sender: object, **extra: object) -> None:
        seen.append(extra)

    with signals.call_failed.connected_to(on_failed, sender=app):
        failing_ledger(app).failed([call()], "http_400", status=400, error=collector_error())
    (extra,) = seen
    error = str(extra["error"])
    assert "***@***" in error
    assert not [s for s in SECRETS if s in error]


def raise_with_email() -> None:
    raise LookupError(f"no account for {EMAIL}")


def test_describe_error_names_type_and_place_not_message() -> None:
    try:
        raise_with_email()
    except LookupError as exc:
        text = describe_error(exc)
    assert text.startswith("LookupError at test_ledger.py:")
    assert text.endswith(" in raise_with_email")
    assert EMAIL not in text


@pytest.mark.allow_errors
def test_a_signal_receiver_that_raises_is_logged_without_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flask import Flask

    from flask_koala import signals

    app = Flask(__name__)

    def on_failed(sender: object, **extra: object) -> None:
        raise_with_email()

    with signals.call_failed.connected_to(on_failed, sender=app):
        failing_ledger(app).failed([call()], "http_400", status=400)
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.getMessage().startswith(
        "flask-koala: a receiver of the koala-call-failed signal raised LookupError at "
    )
    assert error.exc_info is None
    assert EMAIL not in caplog.text
