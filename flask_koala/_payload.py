"""One call to Koala as plain values, the checks it passes first, and the body it becomes.

Everything that reaches Koala passes through here: emails and traits are untrusted input
(a user's profile, an ORM row), so each check answers with a skip reason instead of raising.
The request thread only validates and copies; :func:`build_body` and JSON encoding run in
the worker.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional, overload

from ._ids import format_message_id, next_message_id
from ._redact import redact

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_ENTRIES",
    "ROUTES",
    "Call",
    "build_body",
    "clean_email",
    "clean_event",
    "clean_traits",
    "dates_as_text",
    "encode_body",
    "fits",
    "format_sent_at",
    "kwargsrepr",
    "size_bound",
]

logger = logging.getLogger("flask_koala")

#: Koala takes at most this many entries in each of ``identifies``, ``events``, ``page_views``.
MAX_ENTRIES = 30
#: A single call whose body would be larger than this is skipped as ``too_large``.
MAX_BODY_BYTES = 32 * 1024
#: The route of each kind of call (see :attr:`Call.route`); the HTTP handler maps a route
#: to its URL.
ROUTES = {"identify": "profile", "track": "profile"}
_MAX_EMAIL = 254
_MAX_EVENT = 255
_MAX_DEPTH = 8
# Room for the envelope around the traits: ids, timestamps, keys, punctuation (about 220
# bytes today).
_ENVELOPE_BYTES = 512
# Lone surrogates (U+D800..U+DFFF) are what a JSON API hands over for a broken "\ud83d"
# escape; they cannot be encoded as UTF-8, so a value holding one can never be sent.
_BAD_EMAIL_CHARS = re.compile("[\\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# One int object per distinct size bound, shared by the calls that have it: a bound is
# above CPython's cached small ints, so 10,000 waiting calls would otherwise hold 10,000
# ints of 32 bytes, for a few dozen distinct values. Capped: it can never grow far.
_BOUNDS: dict[int, int] = {}
_MAX_BOUNDS = 1024
# The dates a caller of clean_traits may keep as they are (``keep_dates``), to be written
# as ISO text when the body is built, off the request thread: isoformat() is C code a login
# touches nowhere else, and after an idle pause it cost a login some 10 µs. Only these
# exact types, naive or with a fixed-offset ``timezone``, so that writing them later can
# neither fail nor run the app's code; each with its longest ISO form, quotes included.
_DATES_KEPT: dict[type, int] = {_dt.datetime: 44, _dt.date: 12, _dt.time: 33}


class Call(NamedTuple):
    """One identify or track, reduced to plain values that are safe to hand to a thread."""

    kind: str  # "identify" or "track"
    #: The message id in parts (see :attr:`message_id`): a prefix its process's ids share
    #: and a number, or the whole id and ``WHOLE_ID``.
    id_prefix: str
    id_number: int
    profile_id: Optional[str]
    email: Optional[str]
    timestamp: float  # when it happened (time.time()), not when it is sent
    traits: Optional[dict[str, Any]] = None
    event: Optional[str] = None
    properties: Optional[dict[str, Any]] = None
    #: An upper bound of the bytes this call adds to a request body (:func:`body_bound`);
    #: the queue keeps a batch of several calls within :data:`MAX_BODY_BYTES` with it.
    size: int = 0

    @property
    def message_id(self) -> str:
        """The id Koala de-duplicates this call by, the same on every attempt."""
        return format_message_id(self.id_prefix, self.id_number)

    @property
    def person(self) -> tuple[Optional[str], Optional[str]]:
        """Calls with the same person may share one request; others never do."""
        return (self.profile_id, self.email)

    @property
    def route(self) -> str:
        """The endpoint this kind of call goes to; only calls with one route share a request.

        Identify and track both go to the profile route, ``/web/projects/{key}/batch``.
        """
        return ROUTES[self.kind]

    @classmethod
    def identify(
        cls, *, profile_id: Optional[str], email: str, traits: dict[str, Any], size: int = 0
    ) -> Call:
        """A new identify call, stamped now, with a fresh ``message_id``."""
        prefix, number = next_message_id()
        now = time.time()
        return cls("identify", prefix, number, profile_id, email, now, traits, None, None, size)

    @classmethod
    def track(
        cls,
        *,
        profile_id: Optional[str],
        email: Optional[str],
        event: str,
        properties: dict[str, Any],
        size: int = 0,
    ) -> Call:
        """A new track call, stamped now, with a fresh ``message_id``."""
        prefix, number = next_message_id()
        now = time.time()
        return cls("track", prefix, number, profile_id, email, now, None, event, properties, size)


def clean_email(value: object) -> Optional[str]:
    """Return the email stripped, or ``None`` when it is not a plausible address."""
    if not isinstance(value, str):
        return None
    email = value.strip()
    if not email or len(email) > _MAX_EMAIL or _BAD_EMAIL_CHARS.search(email):
        return None
    local, at, domain = email.partition("@")
    if not at or not local or not domain or "@" in domain:
        return None
    return email


def clean_event(value: object) -> Optional[str]:
    """Return the event name stripped, or ``None`` for an empty, over-long or non-string one."""
    if not isinstance(value, str):
        return None
    event = value.strip()
    if not event or len(event) > _MAX_EVENT or not event.isprintable():
        return None
    return event


class _Drop:
    """Marks a value JSON cannot carry; its key is left out."""


_DROP = _Drop()


class _Unencodable(ValueError):
    """A string that no UTF-8 body can carry: the whole mapping is refused."""


def _check_text(text: str) -> None:
    # isascii() is O(1) in CPython: only non-ASCII text pays for the search.
    if not text.isascii() and _SURROGATE.search(text):
        raise _Unencodable


def clean_traits(
    value: object, *, keep_dates: bool = False
) -> tuple[Optional[dict[str, Any]], int]:
    """Copy traits into plain JSON values.

    Args:
        value: the traits, untrusted.
        keep_dates: keep a top-level ``datetime``, ``date`` or ``time`` (naive or with a
            fixed-offset ``timezone``) as it is, immutable, for :func:`dates_as_text` to
            write when the body is built; the request thread's way.

    Returns:
        ``(traits, size)``: ``traits`` is ``None`` when ``value`` is not a mapping, or
        when a key or string anywhere in it holds a lone surrogate (UTF-8 cannot encode
        it); ``size`` bounds the encoded size in bytes from above. Datetimes and dates
        become ISO strings, ``Decimal`` and ``UUID`` strings. A key that is not a string,
        or a value JSON cannot encode (NaN, infinities, huge ints), drops that one key,
        logged at DEBUG.
    """
    if value is None:
        return {}, 2
    # type() first: isinstance() against an ABC runs Python code, and traits are dicts.
    if type(value) is not dict and not isinstance(value, Mapping):
        return None, 0
    try:
        return _plain_mapping(value, 0, keep_dates)
    except Exception:
        # A lone surrogate, a mapping that changes while we read it, too deep a nesting, or
        # the app's own mapping type raising anything at all while it is read.
        return None, 0


def _plain_mapping(
    value: Mapping[Any, Any], depth: int, keep_dates: bool = False
) -> tuple[dict[str, Any], int]:
    # Size bounds: a str's JSON form is at most 6 bytes a character (\u00XX escapes; a
    # character outside the BMP is one str character and 4 UTF-8 bytes), and at most 2
    # when it is printable ASCII (only '"' and '\\' are escaped): see _text_bound, inlined
    # here for string values. Keys are short: 6 a character is bound enough.
    out: dict[str, Any] = {}
    size = 2
    for key, item in value.items():
        if type(key) is not str and not isinstance(key, str):
            logger.debug("flask-koala: dropped a trait with a non-string key")
            continue
        # The common cases first, without a call: this runs on the request thread.
        if not key.isascii():
            _check_text(key)
        kind = type(item)
        if kind is str:
            if item.isascii():
                size += 6 * len(key) + (2 if item.isprintable() else 6) * len(item) + 6
            else:
                _check_text(item)
                size += 6 * (len(key) + len(item)) + 6
            out[key] = item
            continue
        if item is None or kind is bool or (kind is int and -(10**18) < item < 10**18):
            size += 6 * len(key) + 26
            out[key] = item
            continue
        if keep_dates:
            bound = _DATES_KEPT.get(kind)
            if bound is not None and (
                kind is _dt.date or item.tzinfo is None or type(item.tzinfo) is _dt.timezone
            ):
                size += 6 * len(key) + 4 + bound
                out[key] = item
                continue
        plain, item_size = _plain(item, depth + 1)
        if plain is _DROP:
            logger.debug("flask-koala: dropped trait %r: JSON cannot encode it", redact(key, 60))
            continue
        size += 6 * len(key) + 4 + item_size
        out[key] = plain
    return out, size


def _text_bound(text: str) -> int:
    """At most how many bytes ``text`` takes inside a JSON string, quotes not counted."""
    return 2 * len(text) if text.isascii() and text.isprintable() else 6 * len(text)


def _plain(value: Any, depth: int) -> tuple[Any, int]:
    if value is None or isinstance(value, bool):
        return value, 5
    if isinstance(value, str):
        _check_text(value)
        return value, _text_bound(value) + 2
    if isinstance(value, int):
        if abs(value) >= 10**30:
            return _DROP, 0
        return value, len(str(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            return _DROP, 0
        return value, 25
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        text = value.isoformat()  # ASCII digits and signs; up to 42 characters
        return text, len(text) + 2
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        text = str(value)
        return text, len(text) + 2
    if depth >= _MAX_DEPTH:
        return _DROP, 0
    if isinstance(value, Mapping):
        return _plain_mapping(value, depth)
    if isinstance(value, (list, tuple)):
        items = []
        size = 2
        for item in value:
            plain, item_size = _plain(item, depth + 1)
            if plain is _DROP:
                return _DROP, 0
            size += item_size + 1
            items.append(plain)
        return items, size
    return _DROP, 0


@overload
def dates_as_text(values: dict[str, Any]) -> dict[str, Any]: ...
@overload
def dates_as_text(values: None) -> None: ...
def dates_as_text(values: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """``values`` with the dates :func:`clean_traits` kept (``keep_dates``) as ISO text: a
    copy when it kept any, else ``values`` itself. Never changes ``values``."""
    if values:
        for value in values.values():
            if type(value) in _DATES_KEPT:
                return {
                    key: item.isoformat() if type(item) in _DATES_KEPT else item
                    for key, item in values.items()
                }
    return values


def size_bound(call: Call, traits_bound: int) -> int:
    """An upper bound of the encoded body of this call alone, in bytes, in O(1).

    Args:
        traits_bound: the bound :func:`clean_traits` gave for the traits or properties.
    """
    return body_bound(call.kind, call.email, call.event, traits_bound)


def body_bound(kind: str, email: Optional[str], event: Optional[str], traits_bound: int) -> int:
    """:func:`size_bound` from the parts, before the call is made.

    The email, the event name and the envelope are added to ``traits_bound``: the email
    twice for an identify (at the top and in the traits), once for a track.
    """
    bound = traits_bound + _ENVELOPE_BYTES
    if email is not None:
        bound += (2 if kind == "identify" else 1) * (6 * len(email) + 12)
    if event is not None:
        bound += 6 * len(event) + 2
    if len(_BOUNDS) < _MAX_BOUNDS:
        return _BOUNDS.setdefault(bound, bound)
    return _BOUNDS.get(bound, bound)


def fits(call: Call, traits_bound: int) -> bool:
    """Whether the body of this single call, encoded, is at most :data:`MAX_BODY_BYTES`.

    The O(1) :func:`size_bound` settles nearly every call; only one whose bound is over
    the limit pays for encoding the body exactly as it would be sent.
    """
    if size_bound(call, traits_bound) <= MAX_BODY_BYTES:
        return True
    return len(encode_body(build_body([call]))) <= MAX_BODY_BYTES


def format_sent_at(timestamp: float) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``, as Koala's ``sent_at`` wants it."""
    millis = int(timestamp * 1000)
    seconds, ms = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def entry(call: Call) -> dict[str, Any]:
    """The ``identifies[]`` or ``events[]`` entry for one call."""
    if call.kind == "identify":
        return {
            "type": "identify",
            "message_id": call.message_id,
            "sent_at": format_sent_at(call.timestamp),
            "traits": dates_as_text(call.traits),
        }
    return {
        "type": "track",
        "event": call.event,
        "properties": dates_as_text(call.properties),
        "message_id": call.message_id,
        "sent_at": format_sent_at(call.timestamp),
    }


def build_body(calls: Sequence[Call]) -> dict[str, Any]:
    """The request body for calls about one person (at most 30 of each kind)."""
    first = calls[0]
    body: dict[str, Any] = {}
    if first.profile_id is not None:
        body["profile_id"] = first.profile_id
    if first.email is not None:
        body["email"] = first.email
    identifies = [entry(c) for c in calls if c.kind == "identify"]
    events = [entry(c) for c in calls if c.kind == "track"]
    if identifies:
        body["identifies"] = identifies
    if events:
        body["events"] = events
    return body


def encode_body(body: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def kwargsrepr(message_id: str) -> str:
    """What a Celery task message shows of its arguments: its ``kwargsrepr`` header, in
    Celery's logs, events and monitors. The message id only, never the body (the email)."""
    return f"{{'message_id': {message_id!r}}}"
