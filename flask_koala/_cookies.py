"""The ``ko_id`` visitor id: checking what the browser sent, and minting a new one."""

from __future__ import annotations

import re
import uuid
from typing import Optional

__all__ = ["mint_profile_id", "parse_profile_id"]

# Canonical 8-4-4-4-12 text form only; uuid.UUID() would also take braces, "urn:uuid:" and
# bare hex, none of which the pixel writes.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_profile_id(value: object) -> Optional[str]:
    """Return the visitor id in lowercase canonical form, or ``None`` when it is not one.

    The value comes from a cookie, so anything at all may arrive: other types, over-long
    strings, padding. Only a UUID in canonical text form (any case) is accepted.
    """
    if not isinstance(value, str) or len(value) != 36 or not _UUID.fullmatch(value):
        return None
    return value.lower()


def mint_profile_id() -> str:
    """A fresh visitor id, as Koala's server-side reference mints one: a UUID v4."""
    return str(uuid.uuid4())
