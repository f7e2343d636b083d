"""Redaction: what a log line or the terminal may show of a person or a workspace."""

from __future__ import annotations

import pytest

from flask_koala._redact import redact

PROFILE_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"


def test_redact_masks_emails_visitor_ids_and_keys() -> None:
    text = redact(f"bad profile {PROFILE_ID.upper()} for jane@example.com in pk_live123")
    assert text == "bad profile <uuid> for ***@*** in <key>"


def test_redact_masks_any_key_in_the_endpoints_path() -> None:
    text = redact("no workspace at https://koala.example.com/web/projects/workspace42/batch")
    assert text == "no workspace at https://koala.example.com/web/projects/<key>/batch"


def test_redact_masks_the_key_it_is_given_wherever_it_appears() -> None:
    assert redact("unknown workspace workspace42.", key="workspace42") == "unknown workspace <key>."


def test_redact_shortens_and_drops_control_characters() -> None:
    text = redact("x\n" * 500)
    assert len(text) <= 200
    assert "\n" not in text


@pytest.mark.parametrize(
    "echoed",
    [
        "jane.doe%40example.com",
        "jane.doe%2540example.com",
        "JANE.DOE%40EXAMPLE.COM",
        "jane.doe&#64;example.com",
        "jane.doe&#x40;example.com",
        "jane.doe\\u0040example.com",
        "jane.doe&commat;example.com",
        "jane.doe\uff20example.com",
        "jane.doe\ufe6bexample.com",
        "email=jane.doe%2Bnews%40example.com&plan=pro",
    ],
)
def test_redact_masks_encoded_emails(echoed: str) -> None:
    text = redact(f"invalid email {echoed} in request")
    assert text.startswith("invalid email ***@***")
    assert "jane" not in text.lower()
    assert "example" not in text.lower()


def test_redact_leaves_percent_signs_alone() -> None:
    assert redact("50%40 off, 100% sure") == "50%40 off, 100% sure"
