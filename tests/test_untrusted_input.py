"""Input no body can carry is skipped on the request thread, counted, and never sent.

Lone surrogates (what a JSON API hands over for a broken ``\\ud83d`` escape) cannot be
encoded as UTF-8; the body-size bound counts the encoded bytes of the body as sent.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from flask import Flask

from flask_koala import Koala
from flask_koala._payload import MAX_BODY_BYTES, Call, build_body, encode_body
from flask_koala._receiver import KoalaReceiver

from .support import PROFILE_ID, delivered, flushed_stats, visitor

LONE = "\ud83d"
EMOJI_EMAIL = "\U0001f600" * 235 + "@example.com"  # 247 characters, 952 bytes


@pytest.mark.parametrize(
    ("email", "traits", "reason"),
    [
        (f"jane{LONE}@example.com", {}, "bad_email"),
        ("jane@example.com", {"name": f"Jane {LONE}"}, "bad_traits"),
        ("jane@example.com", {f"name{LONE}": "Jane"}, "bad_traits"),
        ("jane@example.com", {"org": {"tags": [LONE]}}, "bad_traits"),
        ("jane@example.com", {"bio": "x" * 40_000 + LONE}, "bad_traits"),
    ],
)
def test_identify_with_a_lone_surrogate_is_skipped(
    make_app: Callable[..., Flask],
    koala: Koala,
    receiver: KoalaReceiver,
    email: str,
    traits: dict[str, Any],
    reason: str,
) -> None:
    app = make_app(koala=koala)
    with app.app_context():
        assert koala.identify(email, traits, profile_id=PROFILE_ID) is False
    counts = flushed_stats(app)
    assert counts["skipped"] == 1
    assert counts[f"skipped.{reason}"] == 1
    assert counts["failed"] == counts["queued"] == 0
    assert receiver.calls == []


@pytest.mark.parametrize(
    ("email", "properties", "reason"),
    [
        (f"jane{LONE}@example.com", {}, "bad_email"),
        ("jane@example.com", {"plan": LONE}, "bad_properties"),
        ("jane@example.com", {"blob": "y" * 40_000 + LONE}, "bad_properties"),
    ],
)
def test_track_with_a_lone_surrogate_is_skipped(
    make_app: Callable[..., Flask],
    koala: Koala,
    receiver: KoalaReceiver,
    email: str,
    properties: dict[str, Any],
    reason: str,
) -> None:
    app = make_app(koala=koala)
    with app.app_context():
        assert koala.track("Renewed", properties, email=email, profile_id=PROFILE_ID) is False
    counts = flushed_stats(app)
    assert counts[f"skipped.{reason}"] == 1
    assert counts["failed"] == counts["queued"] == 0
    assert receiver.calls == []


@pytest.mark.parametrize(
    ("loaded", "reason"),
    [
        ({"email": f"jane{LONE}@example.com"}, "bad_email"),
        ({"email": "jane@example.com", "company": "x" * 20_000 + LONE}, "bad_traits"),
    ],
)
def test_login_with_a_lone_surrogate_is_skipped(
    make_app: Callable[..., Flask],
    koala: Koala,
    receiver: KoalaReceiver,
    loaded: dict[str, Any],
    reason: str,
) -> None:
    koala.identity_loader(lambda user: loaded)
    app = make_app(koala=koala)
    assert visitor(app).post("/login/jane").status_code == 200
    counts = flushed_stats(app)
    assert counts[f"skipped.{reason}"] == 1
    assert counts["failed"] == counts["queued"] == 0
    assert receiver.calls == []


# -- the body-size bound at its edge -------------------------------------------------------


def pad_to(size: int, make: Callable[[dict[str, Any]], Call]) -> dict[str, Any]:
    """Traits whose call, made by ``make``, has a body of exactly ``size`` bytes.

    Small ints, whose size bound is near exact: a bound that miscounts the email (952
    bytes, twice in an identify) lets a body over the limit through.
    """
    base = len(encode_body(build_body([make({"pad": []})])))
    zeros, odd = divmod(size - base + 1, 2)  # "[0,0,...]" grows 2 bytes an element
    traits: dict[str, Any] = {"pad": [0] * zeros}
    if odd:
        traits["pad"][0] = 10
    assert len(encode_body(build_body([make(traits)]))) == size
    return traits


def an_identify(traits: dict[str, Any]) -> Call:
    traits = {**traits, "email": EMOJI_EMAIL}  # as identify() adds it, last
    return Call.identify(profile_id=PROFILE_ID, email=EMOJI_EMAIL, traits=traits)


def a_track(properties: dict[str, Any]) -> Call:
    return Call.track(
        profile_id=PROFILE_ID, email=EMOJI_EMAIL, event="Renewed", properties=properties
    )


def test_identify_body_of_exactly_the_limit_is_sent(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    with app.app_context():
        assert koala.identify(
            EMOJI_EMAIL, pad_to(MAX_BODY_BYTES, an_identify), profile_id=PROFILE_ID
        )
    assert len(delivered(app, receiver)) == 1
    assert [len(call.raw) for call in receiver.calls] == [MAX_BODY_BYTES]


def test_identify_body_one_byte_over_the_limit_is_skipped(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    traits = pad_to(MAX_BODY_BYTES + 1, an_identify)
    with app.app_context():
        assert koala.identify(EMOJI_EMAIL, traits, profile_id=PROFILE_ID) is False
    assert flushed_stats(app)["skipped.too_large"] == 1
    assert receiver.calls == []


def test_track_body_of_exactly_the_limit_is_sent(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    properties = pad_to(MAX_BODY_BYTES, a_track)
    with app.app_context():
        assert koala.track("Renewed", properties, email=EMOJI_EMAIL, profile_id=PROFILE_ID)
    assert len(delivered(app, receiver)) == 1
    assert [len(call.raw) for call in receiver.calls] == [MAX_BODY_BYTES]


def test_track_body_one_byte_over_the_limit_is_skipped(
    app: Flask, koala: Koala, receiver: KoalaReceiver
) -> None:
    properties = pad_to(MAX_BODY_BYTES + 1, a_track)
    with app.app_context():
        assert not koala.track("Renewed", properties, email=EMOJI_EMAIL, profile_id=PROFILE_ID)
    assert flushed_stats(app)["skipped.too_large"] == 1
    assert receiver.calls == []
