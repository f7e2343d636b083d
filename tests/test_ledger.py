"""The ledger: counts, rate-limited warnings, and what it never logs."""

from __future__ import annotations

import logging

import pytest

from flask_koala._ledger import Ledger, Throttle, redact
from flask_koala._payload import Call

PROFILE_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"


def call() -> Call:
    return Call.identify(profile_id=PROFILE_ID, email="jane@example.com", traits={})


def test_redact_masks_emails_visitor_ids_and_keys() -> None:
    text = redact(f"bad profile {PROFILE_ID.upper()} for jane@example.com in pk_live123")
    assert text == "bad profile <uuid> for ***@*** in <key>"


def test_redact_shortens_and_drops_control_characters() -> None:
    text = redact("x\n" * 500)
    assert len(text) <= 200
    assert "\n" not in text


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
