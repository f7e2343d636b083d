"""The ko_id cookie is untrusted: only a canonical UUID passes."""

from __future__ import annotations

import uuid

import pytest

from flask_koala._ids import mint_profile_id, new_uuid, parse_profile_id

VALID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"


def test_valid_uuid_passes() -> None:
    assert parse_profile_id(VALID) == VALID


def test_uppercase_is_normalised() -> None:
    assert parse_profile_id(VALID.upper()) == VALID


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        42,
        "not-a-uuid",
        VALID + "0",
        VALID[:-1],
        "{" + VALID + "}",
        "urn:uuid:" + VALID,
        VALID.replace("-", ""),
        " " + VALID,
        VALID + "\n",
        "x" * 10_000,
        "3f2504e0-4f89-41d3-9a0c-0305e82c330g",
    ],
)
def test_anything_else_is_rejected(value: object) -> None:
    assert parse_profile_id(value) is None


def test_minted_id_is_uuid4() -> None:
    minted = mint_profile_id()
    assert uuid.UUID(minted).version == 4
    assert parse_profile_id(minted) == minted


def test_new_uuid_is_a_canonical_version_4_uuid() -> None:
    value = new_uuid()
    parsed = uuid.UUID(value)
    assert str(parsed) == value
    assert parsed.version == 4
    assert parsed.variant == uuid.RFC_4122


def test_new_uuids_differ() -> None:
    assert len({new_uuid() for _ in range(1000)}) == 1000
