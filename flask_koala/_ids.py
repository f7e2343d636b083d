"""The UUIDs flask-koala reads and makes: ``ko_id`` visitor ids and message ids.

One text form, one pattern: what the pixel writes and Koala expects is the canonical
8-4-4-4-12 form; ``uuid.UUID()`` would also take braces, ``"urn:uuid:"`` and bare hex.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Optional

__all__ = [
    "UUID_TEXT",
    "WHOLE_ID",
    "format_message_id",
    "mint_profile_id",
    "new_uuid",
    "next_message_id",
    "parse_profile_id",
]

#: A UUID in canonical text form, any case (a pattern to embed; match it whole).
UUID_TEXT = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UUID = re.compile(UUID_TEXT)
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def parse_profile_id(value: object) -> Optional[str]:
    """Return the visitor id in lowercase canonical form, or ``None`` when it is not one.

    The value comes from a cookie, so anything at all may arrive: other types, over-long
    strings, padding. Only a UUID in canonical text form (any case) is accepted.
    """
    if not isinstance(value, str) or len(value) != 36 or not _UUID.fullmatch(value):
        return None
    return value.lower()


def new_uuid() -> str:
    """A random (version 4) UUID in canonical lowercase text.

    The same as ``str(uuid.uuid4())`` at half its cost: message ids are made on the request
    thread, once per call. Of 16 random bytes, the version nibble becomes ``4`` and the
    variant nibble keeps its two low bits under the ``10`` of RFC 4122.
    """
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


# The message ids' seed: the process it was drawn in, the random first 24 characters
# ("xxxxxxxx-xxxx-4xxx-yxxx-") and the counter for the last 12. One tuple, replaced whole, so
# a thread never pairs one seed's prefix with another's counter.
_Seed = tuple[int, str, Iterator[int]]
_COUNT = 1 << 48  # ids per seed: 12 hex digits
_seed: _Seed = (-1, "", iter(()))


#: The ``number`` of a message id whose ``prefix`` is the whole id (a deferred call's).
WHOLE_ID = -1


def next_message_id() -> tuple[str, int]:
    """A unique id for one call in parts, ``(prefix, number)``: see :func:`format_message_id`.

    Message ids need to be unique, not unguessable (Koala de-duplicates by them): each process
    draws 74 random bits once and counts up in the last 48, so an id costs no system call
    for random bytes. The seed is drawn again in a forked child (the pid is checked on every
    call, so a fork that skipped Python's hooks is covered too) and after 2**48 ids. A
    waiting call keeps the parts (a prefix every id of the seed shares, and an int) instead
    of 36 characters of its own: about 60 bytes less a call in a backlog.
    """
    seed = _seed
    if seed[0] != os.getpid():
        seed = _draw_seed()
    number = next(seed[2], None)
    if number is None:  # this seed's ids are used up
        seed = _draw_seed()
        number = next(seed[2])
    return seed[1], number


def format_message_id(prefix: str, number: int) -> str:
    """The text of a message id from its parts, canonical version 4 UUID form
    (:data:`WHOLE_ID`: ``prefix`` is the id)."""
    return prefix if number == WHOLE_ID else f"{prefix}{number:012x}"


def _draw_seed() -> _Seed:
    """A fresh seed for this process, kept for the next calls."""
    global _seed
    _seed = (os.getpid(), new_uuid()[:24], iter(range(_COUNT)))
    return _seed


def mint_profile_id() -> str:
    """A fresh visitor id, as Koala's server-side reference mints one: a UUID v4."""
    return new_uuid()
