"""Emails, traits and bodies: untrusted input in, the contract out."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from typing import Any

import pytest

from flask_koala import _payload
from flask_koala._payload import (
    MAX_BODY_BYTES,
    Call,
    body_bound,
    build_body,
    clean_email,
    clean_event,
    clean_traits,
    encode_body,
    fits,
    format_sent_at,
    size_bound,
)
from flask_koala._receiver import check_body

PROFILE_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
#: The longest offset a ``timezone`` can have in ISO text: seconds and microseconds.
SECOND_OFFSET = dt.timezone(-dt.timedelta(hours=23, minutes=59, seconds=59, microseconds=9))


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
        "jane\udc80@example.com",
        "jane@example.com\ud83d",
        "\ud83d\ude00\ud83d@example.com",
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


class Zone(dt.tzinfo):
    """A time zone of the app's own: its methods are the app's code."""

    def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=1)

    def dst(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, when: dt.datetime | None) -> str:
        return "APP"


KEPT_DATES = {
    "at": dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc),
    "naive": dt.datetime(2026, 11, 28, 12, 0, 0, 5),
    "day": dt.date(2026, 11, 28),
    "time": dt.time(9, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
}


def test_traits_keep_dates_as_they_are_when_asked() -> None:
    traits, _ = clean_traits(KEPT_DATES, keep_dates=True)
    assert traits == KEPT_DATES
    assert all(traits[key] is value for key, value in KEPT_DATES.items())


def test_kept_dates_become_the_same_text_in_the_body() -> None:
    kept, _ = clean_traits(KEPT_DATES, keep_dates=True)
    written, _ = clean_traits(KEPT_DATES)
    assert kept is not None
    assert written is not None
    (entry,) = build_body([identify(kept)])["identifies"]
    assert entry["traits"] == {**written, "email": "jane@example.com"}


def test_kept_dates_become_text_in_a_tracks_properties() -> None:
    kept, _ = clean_traits(KEPT_DATES, keep_dates=True)
    assert kept is not None
    (entry,) = build_body([track_call(None, kept)])["events"]
    assert entry["properties"]["day"] == "2026-11-28"


def test_building_the_body_leaves_the_kept_dates_in_the_call() -> None:
    kept, _ = clean_traits(KEPT_DATES, keep_dates=True)
    assert kept is not None
    call = identify(kept)
    build_body([call])
    assert call.traits is not None
    assert call.traits["at"] is KEPT_DATES["at"]


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2026, 11, 28, tzinfo=Zone()),  # writing it would run the app's code
        dt.time(9, 30, tzinfo=Zone()),
        type("Moment", (dt.datetime,), {})(2026, 11, 28),  # a subclass: its own isoformat
    ],
)
def test_dates_the_worker_cannot_write_safely_are_written_at_once(value: Any) -> None:
    traits, _ = clean_traits({"at": value}, keep_dates=True)
    assert traits == {"at": value.isoformat()}


def test_dates_inside_a_trait_are_written_at_once() -> None:
    traits, _ = clean_traits({"history": [dt.date(2026, 1, 2)]}, keep_dates=True)
    assert traits == {"history": ["2026-01-02"]}


def test_unencodable_trait_drops_only_that_key() -> None:
    traits, _ = clean_traits({"plan": "pro", "obj": object(), "nan": float("nan")})
    assert traits == {"plan": "pro"}


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), [1.0, float("-inf")]])
def test_infinite_trait_drops_only_that_key(value: Any) -> None:
    traits, _ = clean_traits({"plan": "pro", "score": value})
    assert traits == {"plan": "pro"}
    assert b"Infinity" not in encode_body({"traits": traits})


def test_email_with_astral_characters_passes() -> None:
    email = "jan\U0001f600@example.com"
    assert clean_email(email) == email


@pytest.mark.parametrize(
    "traits",
    [
        {"name": "Jane \ud83d"},
        {"name\udc00": "Jane"},
        {"tags": ["ok", "\udfff"]},
        {"org": {"name": "Acme \ud800 Inc"}},
        {"bio": "x" * 40_000 + "\ud83d"},
    ],
)
def test_traits_with_a_lone_surrogate_are_refused(traits: dict[str, Any]) -> None:
    assert clean_traits(traits) == (None, 0)


def test_traits_with_astral_characters_pass() -> None:
    traits, _ = clean_traits({"name": "Jan\U0001f600 \u00e9"})
    assert traits == {"name": "Jan\U0001f600 \u00e9"}


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


@pytest.mark.parametrize("text", ['"' * 300, "\\" * 300, "plain ascii" * 30, "\x01" * 300])
def test_size_bound_covers_ascii_text_with_escapes(text: str) -> None:
    traits, bound = clean_traits({text: text, "list": [text]})
    assert bound >= len(json.dumps(traits, separators=(",", ":"), ensure_ascii=False).encode())


def test_size_bound_of_printable_ascii_is_at_most_twice_its_length() -> None:
    # Tight enough that one person's calls with a few KB of traits can share a request.
    _, bound = clean_traits({"notes": "x" * 3000})
    assert bound <= 2 * 3000 + 100


@pytest.mark.parametrize("keep_dates", [False, True])
@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=SECOND_OFFSET),
        dt.time(0, 0, 0, 1, tzinfo=SECOND_OFFSET),
        dt.date(2026, 1, 1),
    ],
)
def test_size_bound_covers_a_date_at_its_longest(value: Any, keep_dates: bool) -> None:
    traits, bound = clean_traits({"": value}, keep_dates=keep_dates)
    assert traits is not None
    written = _payload.dates_as_text(traits)
    assert bound >= len(json.dumps(written, separators=(",", ":")).encode())


def test_calls_with_one_size_bound_share_one_int() -> None:
    # A backlog holds one int per distinct bound, not one per call.
    first = body_bound("identify", "jane@example.com", None, 1000)
    second = body_bound("identify", "jane@example.com", None, 1000)
    assert first == second == 1000 + 512 + 2 * (6 * 16 + 12)
    assert first is second


def test_shared_size_bounds_stop_growing_at_their_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_payload, "_MAX_BOUNDS", len(_payload._BOUNDS))
    before = len(_payload._BOUNDS)
    assert body_bound("track", None, None, 987_654) == 987_654 + 512
    assert len(_payload._BOUNDS) == before


EMOJI_EMAIL = "\U0001f600" * 235 + "@example.com"  # 247 characters, 952 bytes


def traits_of_every_kind() -> dict[str, Any]:
    return {
        "name": '"Jane" \\ \x01 \U0001f600' * 20,
        "ids": list(range(10**6, 10**6 + 200)),
        "at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        "n": -(10**17),
        "x": 1e300,
        "org": {"\U0001f600" * 10: [None, True, "\x00" * 30]},
    }


def track_call(email: str | None, properties: dict[str, Any], event: str = "e") -> Call:
    return Call.track(profile_id=PROFILE_ID, email=email, event=event, properties=properties)


@pytest.mark.parametrize("keep_dates", [False, True])
@pytest.mark.parametrize("email", [EMOJI_EMAIL, '"\\"@example.com' * 15, "a@b"])
@pytest.mark.parametrize("kind", ["identify", "track"])
def test_size_bound_is_an_upper_bound_of_the_encoded_body(
    email: str, kind: str, keep_dates: bool
) -> None:
    traits, traits_bound = clean_traits(traits_of_every_kind(), keep_dates=keep_dates)
    assert traits is not None
    if kind == "identify":
        call = identify(traits, email=email)
    else:
        call = track_call(email, traits, event='\U0001f600"' * 120)
    assert size_bound(call, traits_bound) >= len(encode_body(build_body([call])))


def identify(traits: dict[str, Any] | None = None, email: str = "jane@example.com") -> Call:
    return Call.identify(
        profile_id=PROFILE_ID, email=email, traits={**(traits or {}), "email": email}
    )


def test_a_call_keeps_its_message_id() -> None:
    call = identify()
    assert call.message_id == call.message_id
    assert uuid.UUID(call.message_id).version == 4


def test_calls_differ_in_message_id() -> None:
    assert identify().message_id != identify().message_id


def test_small_call_fits() -> None:
    assert fits(identify(), 100)


def test_large_call_does_not_fit() -> None:
    call = identify({"bio": "x" * MAX_BODY_BYTES})
    assert not fits(call, MAX_BODY_BYTES + 10)


def test_call_near_the_limit_is_measured_exactly() -> None:
    call = identify({"bio": "x" * (MAX_BODY_BYTES - 1024)})
    assert fits(call, 6 * MAX_BODY_BYTES)


def padded(make: Any, size: int) -> tuple[Call, int]:
    """A call made by ``make(traits)`` whose body is exactly ``size`` bytes, and the bound
    :func:`clean_traits` gives for its traits (without the email, as the request path has it).

    The padding is a list of small ints, whose size bound is close to exact, so the bound
    cannot hide a miscounted email: only an honest one keeps the call within the limit.
    """
    base = len(encode_body(build_body([make({"pad": []})])))
    zeros, odd = divmod(size - base + 1, 2)  # "[0,0,...]" grows 2 bytes an element
    traits: dict[str, Any] = {"pad": [0] * zeros}
    if odd:
        traits["pad"][0] = 10
    call = make(traits)
    assert len(encode_body(build_body([call]))) == size
    return call, clean_traits(traits)[1]


def identify_emoji(traits: dict[str, Any]) -> Call:
    return identify(traits, email=EMOJI_EMAIL)


def track_emoji(traits: dict[str, Any]) -> Call:
    return track_call(EMOJI_EMAIL, traits)


@pytest.mark.parametrize("make", [identify_emoji, track_emoji])
def test_body_of_exactly_the_limit_fits(make: Any) -> None:
    assert fits(*padded(make, MAX_BODY_BYTES))


@pytest.mark.parametrize("make", [identify_emoji, track_emoji])
def test_body_one_byte_over_the_limit_does_not_fit(make: Any) -> None:
    assert not fits(*padded(make, MAX_BODY_BYTES + 1))


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
