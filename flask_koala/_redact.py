"""What text from outside may show of a person or a workspace: log lines and terminal output.

A collector may echo what it was sent (an email, a visitor id, the workspace key) in its
error text, and apps hand in values of their own (trait keys). :func:`redact` is for log
lines: it masks all of them. :func:`mask` is for a person at a terminal: it keeps enough to
tell calls apart.
"""

from __future__ import annotations

import re
from typing import Optional

from ._ids import UUID_TEXT

__all__ = ["mask", "mask_key", "redact"]

# An '@' as a collector may echo it: plain, URL-encoded once or twice (a query string, a
# path), as an HTML entity (numeric or named) or a JSON escape, or as the fullwidth or small
# commercial at that a normalising collector may turn it into.
_AT = r"(?:@|%40|%2540|&#0*64;|&#x0*40;|&commat;|\\u0040|\uff20|\ufe6b)"
_EMAILISH = re.compile(rf"[^\s@\"'<>]+?{_AT}[^\s@\"'<>]+", re.IGNORECASE)
# A collector may echo what it was sent: visitor ids (UUIDs) and workspace keys too.
_UUIDISH = re.compile(UUID_TEXT)
_KEYISH = re.compile(r"\b[ps]k_[A-Za-z0-9._~-]+")
# Any URL-safe key is accepted, so the one place a key of any shape is known to stand is
# the endpoint's path; the app's own key is masked wherever else it appears (``key=``).
_PROJECT_KEY = re.compile(r"(?<=/projects/)[^/\s\"'<>?#]+")
# A shorter key is masked in the path alone: replacing it everywhere would garble the text.
_MIN_KEY_TO_REPLACE = 4


def redact(text: str, limit: int = 200, *, key: Optional[str] = None) -> str:
    """Shorten text that came from outside; mask emails, visitor ids and keys in it
    (``key``, the app's own, wherever it appears)."""
    text = "".join(ch if ch.isprintable() else " " for ch in text[: limit * 2])
    if key and len(key) >= _MIN_KEY_TO_REPLACE:
        text = text.replace(key, "<key>")
    text = _EMAILISH.sub("***@***", text)
    text = _UUIDISH.sub("<uuid>", text)
    text = _KEYISH.sub("<key>", text)
    text = _PROJECT_KEY.sub("<key>", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mask(text: str) -> str:
    """Text for a person at a terminal, with emails, visitor ids and keys partly masked.

    ``jane@example.com`` becomes ``j***@example.com`` and a UUID keeps its first eight
    digits, so calls can still be told apart; a key keeps its prefix. For CLI output, which
    may be pasted into a ticket; log lines use :func:`redact`.
    """
    text = _EMAILISH.sub(_mask_email, text)
    text = _UUIDISH.sub(lambda m: m.group(0)[:8] + "-…", text)
    text = _KEYISH.sub(lambda m: mask_key(m.group(0)), text)
    return _PROJECT_KEY.sub(lambda m: mask_key(m.group(0)), text)


def mask_key(key: Optional[str]) -> str:
    """The public key with its middle hidden, e.g. ``pk_t…st``: enough to tell keys apart.

    Koala's public key is not a secret (the browser snippet carries it), but a terminal
    may be shared or recorded, and the ends are all anyone needs to recognise it.
    """
    if not key:
        return "(not set)"
    if len(key) <= 6:
        return key[:3] + "…"
    return f"{key[:4]}…{key[-2:]}"


def _mask_email(match: re.Match[str]) -> str:
    local, _, domain = re.split(f"({_AT})", match.group(0), maxsplit=1, flags=re.IGNORECASE)
    return f"{local[:1]}***@{domain}"
