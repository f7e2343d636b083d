"""Emails, traits and bodies: untrusted input in, the contract out."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from typing import Any

import pytest

from flask_koala._payload import (
    MAX_BODY_BYTES,
    Call,
    build_body,
    clean_email,
    clean_event,
    clean_traits,
    encode_body,
    fits,
    format_sent_at,
)
from flask_koala._receiver import check_body

PROFILE_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"


def test_email_is_stripped() -> None:
    assert clean_email("  jane@example.com\n") == "jane@example.com"


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        b"jane@example.com",
        "",
        "jane",
        "@example.com",
        "jane@",
        "jane@@example.com",
        "ja@ne@example.com",
        "jane doe@example.com",
        "jane@exa\x00mple.com",
        "jane@exa\u0085mple.com",
        "a" * 250 + "@x.io",
    ],
)
def test_bad_emails(value: object) -> None:
    assert clean_email(value) is None


def test_email_of_254_characters_passes() -> None:
    email = "a" * 245 + "@x.io.com"
    assert len(email) == 254
    assert clean_email(email) == email


def test_traits_none_is_empty() -> None:
    assert clean_traits(None)[0] == {}


def test_traits_must_be_a_mapping() -> None:
    assert clean_traits(["email"])[0] is None


def test_traits_convert_dates_decimals_uuids() -> None:
    when = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc)
    ident = uuid.UUID(PROFILE_ID)
    traits, _ = clean_traits(
        {"at": when, "day": dt.date(2026, 11, 28), "amount": decimal.Decimal("1.50"), "id": ident}
    )
    assert traits == {
        "at": "2026-11-28T12:00:00+00:00",
        "day": "2026-11-28",
        "amount": "1.50",
        "id": PROFILE_ID,
    }


def test_unencodable_trait_drops_only_that_key() -> None:
    traits, _ = clean_traits({"plan": "pro", "obj": object(), "nan": float("nan")})
    assert traits == {"plan": "pro"}


def test_non_string_keys_are_dropped() -> None:
    traits, _ = clean_traits({1: "one", "two": 2})
    assert traits == {"two": 2}


def test_nested_values_are_copied() -> None:
    source: dict[str, Any] = {"tags": ["a", "b"], "org": {"name": "Acme"}}
    traits, _ = clean_traits(source)
    source["tags"].append("c")
    assert traits == {"tags": ["a", "b"], "org": {"name": "Acme"}}


def test_self_referencing_traits_do_not_crash() -> None:
    loop: dict[str, Any] = {"name": "x"}
    loop["self"] = loop
    traits, _ = clean_traits(loop)
    assert traits is not None
    json.dumps(traits)


def test_size_bound_covers_encoded_size() -> None:
    traits, bound = clean_traits({"bio": '"\\\n\u2028' * 100, "n": 12345, "ok": True})
    assert bound >= len(json.dumps(traits, separators=(",", ":"), ensure_ascii=False).encode())


def identify(traits: dict[str, Any] | None = None, email: str = "jane@example.com") -> Call:
    return Call.identify(
        profile_id=PROFILE_ID, email=email, traits={**(traits or {}), "email": email}
    )


def test_small_call_fits() -> None:
    assert fits(identify(), 100)


def test_large_call_does_not_fit() -> None:
    call = identify({"bio": "x" * MAX_BODY_BYTES})
    assert not fits(call, MAX_BODY_BYTES + 10)


def test_call_near_the_limit_is_measured_exactly() -> None:
    call = identify({"bio": "x" * (MAX_BODY_BYTES - 1024)})
    assert fits(call, 6 * MAX_BODY_BYTES)


def test_sent_at_format() -> None:
    assert format_sent_at(1_764_331_200.123) == "2025-11-28T12:00:00.123Z"


def test_identify_body_passes_the_contract() -> None:
    body = build_body([identify({"plan": "pro"})])
    assert check_body(body) == []
    assert set(body) == {"profile_id", "email", "identifies"}


def test_track_body_passes_the_contract() -> None:
    call = Call.track(profile_id=PROFILE_ID, email=None, event="Signed Up", properties={"a": 1})
    body = build_body([call])
    assert check_body(body) == []
    assert body["events"][0]["event"] == "Signed Up"
    assert "email" not in body


def test_calls_about_one_person_share_a_body() -> None:
    track = Call.track(profile_id=PROFILE_ID, email="jane@example.com", event="e", properties={})
    body = build_body([identify(), identify(), track])
    assert len(body["identifies"]) == 2
    assert len(body["events"]) == 1
    assert check_body(body) == []


def test_encoding_is_compact_utf8() -> None:
    assert encode_body({"a": "é"}) == '{"a":"é"}'.encode()


@pytest.mark.parametrize("value", ["", "   ", None, 7, "a" * 256, "bad\x00name"])
def test_bad_event_names(value: object) -> None:
    assert clean_event(value) is None


def test_event_name_is_stripped() -> None:
    assert clean_event(" Signed Up ") == "Signed Up"
