"""Koala's ingest contract as a strict collector checks it, for the loopback receiver.

:class:`ReceivedCall` is one request as the receiver read it, with its violations.
:func:`check_body` holds the body rules of ``koala-api.md``; :func:`check_request` adds the
method, path, headers and size. The limits are stated here rather than imported from the
payload module, so the receiver checks the client's bounds instead of sharing them.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._ids import UUID_TEXT

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_ENTRIES",
    "ROUTE",
    "Check",
    "ReceivedCall",
    "check_body",
    "check_request",
    "parse_json",
]

#: How many entries Koala takes per array in one request.
MAX_ENTRIES = 30
#: The largest request body Koala takes, in bytes. Stated here rather than imported from the
#: payload module, so the receiver checks the client's size bound instead of sharing it.
MAX_BODY_BYTES = 32 * 1024
_TOP_LEVEL_KEYS = frozenset({"profile_id", "email", "identifies", "events", "page_views"})
_ARRAYS = ("identifies", "events", "page_views")
_UUID = re.compile(UUID_TEXT)
_SENT_AT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
ROUTE = re.compile(r"/web/projects/(?P<key>[^/]*)/(?P<kind>batch|accounts/batch)")
_URL_SAFE_KEY = re.compile(r"[A-Za-z0-9._~-]+")


@dataclass(frozen=True)
class ReceivedCall:
    """One HTTP request the receiver read, and what it answered.

    Attributes:
        method: The HTTP method, e.g. ``"POST"``.
        path: The request target as sent, query string included.
        headers: The request headers, names lower-cased (repeated headers joined by ``", "``).
        raw: The request body bytes exactly as received.
        body: The body parsed as JSON, or None when it is not valid UTF-8 JSON.
        public_key: The workspace key from a Koala endpoint path, else None.
        received_at: ``time.monotonic()`` when the request had been read.
        status: The status answered, or None when the connection was dropped unanswered.
        violations: The contract violations of this request (empty when it was valid).
    """

    method: str
    path: str
    headers: dict[str, str]
    raw: bytes
    body: Any
    public_key: str | None
    received_at: float
    status: int | None
    violations: tuple[str, ...]


def check_body(body: object) -> list[str]:
    """Return the contract violations of one parsed ``/batch`` request body.

    An empty list means the body is valid. The messages are meant for people reading a failed
    test or the receiver's console output; the first one is what the receiver answers in its
    400 body.
    """
    if not isinstance(body, dict):
        return [f"body must be a JSON object, got {_json_type(body)}"]
    out: list[str] = []
    if "profile_id" not in body and "email" not in body:
        out.append("body must name a person: it has neither profile_id nor email")
    if "profile_id" in body:
        profile_id = body["profile_id"]
        # The visitor id as the pixel writes it: canonical and lowercase.
        if not _is_uuid(profile_id) or profile_id != profile_id.lower():
            out.append(f"profile_id must be a canonical lowercase UUID, got {_show(profile_id)}")
    email = body.get("email")
    if "email" in body and not _is_email(email):
        out.append(f"email must be a non-empty string containing '@', got {_show(email)}")
    for key in sorted(set(body) - _TOP_LEVEL_KEYS, key=str):
        allowed = ", ".join(sorted(_TOP_LEVEL_KEYS))
        out.append(f"unexpected top-level key {key!r} (allowed: {allowed})")
    has_entries = False
    for name in _ARRAYS:
        if name not in body:
            continue
        entries = body[name]
        if not isinstance(entries, list):
            out.append(f"{name} must be an array, got {_json_type(entries)}")
            continue
        if len(entries) > MAX_ENTRIES:
            out.append(f"{name} has {len(entries)} entries, at most {MAX_ENTRIES} are allowed")
        has_entries = has_entries or bool(entries)
        for index, entry in enumerate(entries):
            where = f"{name}[{index}]"
            if not isinstance(entry, dict):
                out.append(f"{where} must be an object, got {_json_type(entry)}")
            elif name == "identifies":
                out.extend(_check_identify(where, entry, email))
            elif name == "events":
                out.extend(_check_track(where, entry))
    if not has_entries:
        out.append("body carries no calls: identifies, events and page_views are absent or empty")
    return out


def _check_identify(where: str, entry: dict[str, Any], email: object) -> list[str]:
    out = []
    if entry.get("type") != "identify":
        out.append(f"{where}.type must be 'identify', got {_field(entry, 'type')}")
    out.extend(_check_sent_at(where, entry))
    traits = entry.get("traits")
    if not isinstance(traits, dict):
        out.append(f"{where}.traits must be an object, got {_field(entry, 'traits')}")
    elif isinstance(email, str) and traits.get("email") != email:
        got = _field(traits, "email")
        out.append(f"{where}.traits.email must equal the top-level email {email!r}, got {got}")
    if "message_id" in entry and not _is_uuid(entry["message_id"]):
        out.append(f"{where}.message_id must be a UUID, got {_show(entry['message_id'])}")
    return out


def _check_track(where: str, entry: dict[str, Any]) -> list[str]:
    out = []
    if entry.get("type") != "track":
        out.append(f"{where}.type must be 'track', got {_field(entry, 'type')}")
    event = entry.get("event")
    if not isinstance(event, str) or not event:
        out.append(f"{where}.event must be a non-empty string, got {_field(entry, 'event')}")
    if not isinstance(entry.get("properties"), dict):
        out.append(f"{where}.properties must be an object, got {_field(entry, 'properties')}")
    out.extend(_check_sent_at(where, entry))
    if "message_id" not in entry:
        out.append(f"{where}.message_id is missing (Koala de-duplicates events by it)")
    elif not _is_uuid(entry["message_id"]):
        out.append(f"{where}.message_id must be a UUID, got {_show(entry['message_id'])}")
    return out


def _check_sent_at(where: str, entry: dict[str, Any]) -> list[str]:
    sent_at = entry.get("sent_at")
    if isinstance(sent_at, str) and _SENT_AT.fullmatch(sent_at):
        try:
            datetime.datetime.fromisoformat(sent_at[:-1])
        except ValueError:
            return [f"{where}.sent_at is not a real date and time: {sent_at!r}"]
        return []
    got = _field(entry, "sent_at")
    return [f"{where}.sent_at must be ISO-8601 UTC with milliseconds and Z, got {got}"]


def _is_uuid(value: object) -> bool:
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


def _is_email(value: object) -> bool:
    return isinstance(value, str) and "@" in value


def _field(mapping: dict[str, Any], key: str) -> str:
    return _show(mapping[key]) if key in mapping else "nothing"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and Koala) does not.
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> tuple[Any, str | None]:
    """Parse a request body as strict UTF-8 JSON; return (value, error)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"body is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        return json.loads(text, parse_constant=_reject_constant), None
    except (ValueError, RecursionError) as exc:
        return None, f"body is not valid JSON: {exc}"


def _check_headers(headers: dict[str, str]) -> list[str]:
    out = []
    content_type = headers.get("content-type")
    if content_type is None:
        out.append("Content-Type header is missing, expected application/json")
    else:
        media, *params = (part.strip() for part in content_type.split(";"))
        if media.lower() != "application/json":
            out.append(f"Content-Type is {content_type!r}, expected application/json")
        for param in params:
            if param and param.lower().replace(" ", "") not in {"charset=utf-8", 'charset="utf-8"'}:
                out.append(f"Content-Type parameter {param!r} is not allowed, only charset=utf-8")
    if not headers.get("user-agent", "").strip():
        out.append("User-Agent header is missing or empty (Koala may drop it as bot traffic)")
    return out


class Check(NamedTuple):
    """The verdict on one request, before faults are considered."""

    public_key: str | None
    body: Any
    violations: list[str]
    status: int  # what to answer if there are violations


def check_request(method: str, path: str, headers: dict[str, str], raw: bytes) -> Check:
    body, parse_error = parse_json(raw) if raw else (None, "body is empty")
    route, _, query = path.partition("?")
    match = ROUTE.fullmatch(route)
    if match is None:
        expected = "/web/projects/{PUBLIC_KEY}/batch"
        return Check(None, body, [f"{path!r} is not a Koala endpoint, expected {expected}"], 404)
    key, kind = match["key"], match["kind"]
    if method != "POST":
        return Check(key, body, [f"method {method} is not allowed, Koala takes POST"], 405)
    out = []
    if not key:
        out.append("the public key in the path is empty")
    elif not _URL_SAFE_KEY.fullmatch(key):
        out.append(f"the public key {key!r} in the path is not URL-safe")
    if query:
        out.append(f"unexpected query string {query!r}, Koala's endpoints take none")
    out.extend(_check_headers(headers))
    if parse_error is not None:
        out.append(parse_error)
    elif kind == "batch":
        out.extend(check_body(body))
    elif not isinstance(body, dict):
        out.append(f"body must be a JSON object, got {_json_type(body)}")
    return Check(key, body, out, 400)
