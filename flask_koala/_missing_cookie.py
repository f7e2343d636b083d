"""What a login without a usable ``ko_id`` cookie does: ``KOALA_MISSING_COOKIE``.

Each policy is an object the pipeline calls when a request has no usable cookie
(:class:`~flask_koala._pipeline.MissingCookiePolicy`); :func:`policy_for` picks it from
the setting. ``"skip"`` (the default) is what Koala's identify guide says, and needs nothing
here. The other two cover logins that land before Koala's pixel has run, which SSO and OAuth
callbacks often do:

``"defer"``
    The identify is parked in the Flask session (plain values only: email, a few traits,
    when, a message id) and sent on the first later request of that session that carries a
    valid ``ko_id``, with its original ``sent_at``. It is forgotten after
    ``KOALA_DEFER_MAX_AGE`` or on logout. Counted as ``deferred`` when parked; each one later
    ends as a queued call, or as ``skipped.defer_expired``, ``skipped.defer_cancelled``
    (logout), ``skipped.defer_overflow`` (more than :data:`MAX_DEFERRED` in one session) or
    ``skipped.defer_invalid`` (an entry this version cannot read). One the browser never
    brings back ends uncounted, with its session.

``"mint"``
    As Koala's server-side reference does: a new UUID v4 becomes the visitor id, is set as
    the cookie on the response (readable by the pixel, so not HttpOnly) and the identify is
    sent with it. Later calls in the same request, and :meth:`Koala.profile_id`, use it too.

Only the request thread runs here; nothing leaves the process.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Optional, Union

from flask import Flask, Response, after_this_request, current_app, has_request_context, request
from flask import session as flask_session
from flask.sessions import SecureCookieSessionInterface
from flask_login import user_logged_out

from ._config import KoalaConfig
from ._exceptions import ConfigError
from ._ids import WHOLE_ID, mint_profile_id, new_uuid, parse_profile_id
from ._ledger import Ledger, log_unexpected
from ._payload import Call, clean_email, clean_traits, dates_as_text, encode_body
from ._pipeline import MINTED_KEY, SKIP, Environ, MissingCookiePolicy, Pipeline
from ._state import state_of

__all__ = [
    "COOKIE_MAX_AGE",
    "MAX_DEFERRED",
    "MAX_DEFERRED_TRAITS_BYTES",
    "SESSION_KEY",
    "DeferPolicy",
    "MintPolicy",
    "check_app",
    "init_app",
    "policy_for",
]

logger = logging.getLogger("flask_koala")

#: Where deferred identifies wait in the Flask session.
SESSION_KEY = "_koala_deferred"
#: At most this many deferred identifies per session; the oldest beyond it is skipped.
MAX_DEFERRED = 3
#: Traits (besides the email) kept with a deferred identify only up to this JSON size, so
#: a cookie session stays well under the browsers' 4 KB; larger ones wait without them.
MAX_DEFERRED_TRAITS_BYTES = 256
#: A minted ``ko_id`` lives one year.
COOKIE_MAX_AGE = 365 * 24 * 60 * 60


def policy_for(config: KoalaConfig, ledger: Ledger) -> MissingCookiePolicy:
    """The policy object ``KOALA_MISSING_COOKIE`` names."""
    if config.missing_cookie == "mint":
        return MintPolicy(config)
    if config.missing_cookie == "defer":
        return DeferPolicy(ledger)
    return SKIP


# How far ahead of this server's clock a deferred entry's time may be (another server of
# the app may have written it); anything later is not a login time.
_MAX_CLOCK_SKEW = 86_400.0


def check_app(app: Flask, config: KoalaConfig) -> None:
    """Refuse a policy the app cannot support; ``init_app`` calls it before changing anything.

    Raises:
        ConfigError: ``"defer"`` with Flask's cookie session but no ``SECRET_KEY``.
    """
    if config.missing_cookie != "defer" or config.mode == "disabled":
        return
    interface = app.session_interface
    if isinstance(interface, SecureCookieSessionInterface) and not app.secret_key:
        raise ConfigError(
            "KOALA_MISSING_COOKIE",
            "'defer' keeps the pending identify in the Flask session, which needs SECRET_KEY: "
            "set it before init_app, or use 'skip' or 'mint'",
        )


def init_app(app: Flask, config: KoalaConfig) -> None:
    """Hook the ``"defer"`` policy into the app: send on a later request, forget on logout."""
    if config.missing_cookie != "defer" or config.mode == "disabled":
        return
    app.before_request(send_deferred)
    # Module-level receiver with sender=app: blinker holds receivers weakly.
    user_logged_out.connect(_on_user_logged_out, sender=app)


# -- mint --------------------------------------------------------------------------------


class MintPolicy:
    """``"mint"``: a new visitor id, set as the cookie on this request's response."""

    takes_over = True

    def __init__(self, config: KoalaConfig) -> None:
        self._config = config

    def handle(self, email: str, traits: dict[str, Any], environ: Environ) -> Union[str, bool]:
        """Mint at most once per request: later calls get the same id.

        The cookie is set through ``after_this_request``, so it reaches the response
        whether the login happened in the view (Flask-Login's signal) or after it
        (``@identify_login``).
        """
        existing: Optional[str] = environ.get(MINTED_KEY)
        if existing is not None:
            return existing
        profile_id = mint_profile_id()
        environ[MINTED_KEY] = profile_id
        config = self._config
        cookie = _MintedCookie(
            name=config.cookie_name,
            value=profile_id,
            domain=config.cookie_domain,
            secure=request.is_secure,
        )
        after_this_request(cookie.set_on)
        logger.debug("flask-koala: minted a visitor id for a login without one")
        return profile_id


@dataclasses.dataclass(frozen=True)
class _MintedCookie:
    """The ``ko_id`` to set: plain values, read on the request thread."""

    name: str
    value: str
    domain: Optional[str]
    secure: bool

    def set_on(self, response: Response) -> Response:
        try:
            response.set_cookie(
                self.name,
                self.value,
                max_age=COOKIE_MAX_AGE,
                path="/",
                domain=self.domain,
                secure=self.secure,
                httponly=False,  # Koala's pixel must read it
                samesite="Lax",
            )
        except Exception as exc:
            log_unexpected(exc, "setting the minted cookie", "the response goes on")
        return response


# -- defer -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Deferred:
    """One identify waiting in a session, as read back from it."""

    email: str
    traits: dict[str, Any]
    at: float
    message_id: str

    def to_session(self) -> dict[str, Any]:
        return {"email": self.email, "traits": self.traits, "at": self.at, "id": self.message_id}


class DeferPolicy:
    """``"defer"``: park the identify in the session until a ``ko_id`` arrives."""

    takes_over = True

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def handle(self, email: str, traits: dict[str, Any], environ: Environ) -> Union[str, bool]:
        """Park an identify (already checked); ``True`` when it was parked.

        ``False`` when it was skipped instead: the same email already waits
        (``duplicate``) or the app has no usable session (``no_session``).
        """
        ledger = self._ledger
        pending, invalid = _read(flask_session.get(SESSION_KEY))
        if any(entry.email == email for entry in pending):
            ledger.skipped("duplicate", email=email)
            return False
        # The session takes only JSON: the dates the request thread kept are written here.
        extra = {key: value for key, value in dates_as_text(traits).items() if key != "email"}
        trimmed = bool(extra) and len(encode_body(extra)) > MAX_DEFERRED_TRAITS_BYTES
        if trimmed:
            extra = {}
        pending.append(_Deferred(email, extra, time.time(), new_uuid()))
        overflow, pending = pending[:-MAX_DEFERRED], pending[-MAX_DEFERRED:]
        try:
            flask_session[SESSION_KEY] = [entry.to_session() for entry in pending]
        except RuntimeError:  # Flask's NullSession: no SECRET_KEY after all
            ledger.skipped("no_session", email=email)
            return False
        ledger.deferred("without_traits" if trimmed else None)
        for _ in range(invalid):
            ledger.skipped("defer_invalid")
        for entry in overflow:
            ledger.skipped("defer_overflow", email=entry.email)
        return True


def send_deferred() -> None:
    """``before_request``: send what waits in this session once the visitor has a cookie.

    Also forgets entries older than ``KOALA_DEFER_MAX_AGE`` on any request of the session,
    cookie or not. Never raises into the request.
    """
    try:
        # Touching the session adds ``Vary: Cookie`` to the response; a request without a
        # session cookie cannot have anything waiting, so it is left alone.
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        if app.session_interface.get_cookie_name(app) not in request.cookies:
            return
        if SESSION_KEY not in flask_session:
            return
        state = state_of(app)
        if state is not None:
            _send_deferred(state.ledger, state.config, state.pipeline)
    except Exception as exc:
        log_unexpected(exc, "sending deferred identifies", "the request goes on")


def _send_deferred(ledger: Ledger, config: KoalaConfig, pipeline: Pipeline) -> None:
    pending, invalid = _read(flask_session.get(SESSION_KEY))
    for _ in range(invalid):
        ledger.skipped("defer_invalid")
    now = time.time()
    fresh = []
    for entry in pending:
        if now - entry.at > config.defer_max_age:
            ledger.skipped("defer_expired", email=entry.email)
        else:
            fresh.append(entry)
    profile_id = parse_profile_id(request.cookies.get(config.cookie_name))
    if profile_id is not None or not fresh:
        flask_session.pop(SESSION_KEY, None)
    elif len(fresh) != len(pending) or invalid:
        flask_session[SESSION_KEY] = [entry.to_session() for entry in fresh]
    if profile_id is None:
        return
    for entry in fresh:
        traits = dict(entry.traits)
        traits["email"] = entry.email
        # The login's own time and id: sent_at is when it happened, not when it went out.
        call = Call(
            "identify", entry.message_id, WHOLE_ID, profile_id, entry.email, entry.at, traits
        )
        pipeline.submit_deferred(call, request.environ)


def _on_user_logged_out(sender: Any, user: Any = None, **extra: Any) -> None:
    """Flask-Login's ``user_logged_out``: what waits for this browser is forgotten."""
    try:
        if not has_request_context() or SESSION_KEY not in flask_session:
            return
        raw = flask_session.pop(SESSION_KEY, None)
        state = state_of(sender)
        if state is None:
            return
        pending, invalid = _read(raw)
        for _ in range(invalid):
            state.ledger.skipped("defer_invalid")
        for entry in pending:
            state.ledger.skipped("defer_cancelled", email=entry.email)
    except Exception as exc:
        log_unexpected(exc, "forgetting deferred identifies", "logout goes on")


def _read(raw: object) -> tuple[list[_Deferred], int]:
    """The entries of a session value, and how many could not be read.

    The session is the app's own (signed, or server-side), but it outlives deployments, so
    every field is checked again rather than trusted.
    """
    if raw is None:
        return [], 0
    if not isinstance(raw, list):
        return [], 1
    entries: list[_Deferred] = []
    invalid = 0
    for item in raw:
        entry = _entry(item)
        if entry is None:
            invalid += 1
        else:
            entries.append(entry)
    return entries, invalid


def _entry(item: object) -> Optional[_Deferred]:
    if not isinstance(item, Mapping):
        return None
    email = clean_email(item.get("email"))
    traits, _ = clean_traits(item.get("traits"))
    at = item.get("at")
    message_id = item.get("id")
    if email is None or traits is None or parse_profile_id(message_id) is None:
        return None  # (a message id is a canonical UUID, as a visitor id is)
    if not isinstance(at, (int, float)) or isinstance(at, bool) or not math.isfinite(at):
        return None
    if not 0 <= at <= time.time() + _MAX_CLOCK_SKEW:
        return None  # would never expire, or become a sent_at no collector takes
    return _Deferred(email, traits, float(at), str(message_id))
