"""The ko_id cookie is untrusted: only a canonical UUID passes."""

from __future__ import annotations

import os
import uuid
import warnings

import pytest

from flask_koala import _ids
from flask_koala._ids import (
    WHOLE_ID,
    format_message_id,
    mint_profile_id,
    new_uuid,
    next_message_id,
    parse_profile_id,
)

VALID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"


def new_message_id() -> str:
    return format_message_id(*next_message_id())


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


def test_message_id_is_a_canonical_version_4_uuid() -> None:
    value = new_message_id()
    parsed = uuid.UUID(value)
    assert str(parsed) == value
    assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


def test_message_ids_differ() -> None:
    assert len({new_message_id() for _ in range(1000)}) == 1000


def test_message_ids_of_one_seed_share_one_prefix_object() -> None:
    (first, _), (second, _) = next_message_id(), next_message_id()
    assert first is second  # a waiting call holds a pointer to it, not 36 characters


def test_message_id_parts_format_as_a_canonical_id() -> None:
    prefix, number = next_message_id()
    value = format_message_id(prefix, number)
    assert value == f"{prefix}{number:012x}"
    assert str(uuid.UUID(value)) == value


def test_a_whole_id_formats_as_itself() -> None:
    value = new_uuid()
    assert format_message_id(value, WHOLE_ID) == value


def test_a_used_up_seed_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    before = new_message_id()
    monkeypatch.setattr(_ids, "_seed", (os.getpid(), before[:24], iter(())))
    after = new_message_id()
    assert after[:24] != before[:24]
    assert uuid.UUID(after).version == 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_draws_its_own_seed() -> None:
    parent = new_message_id()
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking while other tests' threads run; harmless here.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, new_message_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    assert uuid.UUID(child).version == 4
    assert child[:24] != parent[:24]
