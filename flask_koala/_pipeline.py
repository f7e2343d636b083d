"""The request-side half of a call, once, in plain Python.

Every way in (Flask-Login's signals, ``@identify_login``, :meth:`Koala.identify`,
:meth:`Koala.track`, deferred identifies, the browser snippet) ends here: who the user is
(:func:`resolve_user`), whether the values are usable, which visitor id to send with, and
the one submit path to the dispatcher. Nothing here imports Flask: the Flask side hands in
the request's WSGI environ (for per-request marks) and its ``ko_id`` cookie as plain values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from time import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Protocol, Union

from ._ids import next_message_id, parse_profile_id
from ._ledger import describe_error
from ._payload import (
    MAX_BODY_BYTES,
    Call,
    body_bound,
    clean_email,
    clean_event,
    clean_traits,
    fits,
    size_bound,
)

if TYPE_CHECKING:
    from ._config import KoalaConfig
    from ._dispatchers import Dispatcher
    from ._ledger import Ledger

__all__ = [
    "MINTED_KEY",
    "WAKE_KEY",
    "Identity",
    "IdentityLoader",
    "MissingCookiePolicy",
    "Pipeline",
    "Resolver",
    "default_identity_loader",
]

logger = logging.getLogger("flask_koala")

IdentityLoader = Callable[[Any], Optional[Mapping[str, Any]]]
Environ = MutableMapping[str, Any]

# Per-request marks live in the WSGI environ rather than ``g``: ``g`` belongs to the app
# context, which several requests share when one was pushed around them.
#: The dispatchers a request queued calls on, to wake once its response is out: a set while
#: the app answers the request (``_hooks`` puts it there), absent otherwise.
WAKE_KEY = "flask_koala.wake"
#: The visitor id minted for this request (``KOALA_MISSING_COOKIE = "mint"``).
MINTED_KEY = "flask_koala.minted_profile_id"
#: The (visitor id, email) pairs this request's accepted identifies were about.
_IDENTIFIED_KEY = "flask_koala.identified"
_new_tuple = tuple.__new__


def default_identity_loader(user: Any) -> Optional[dict[str, Any]]:
    """``{"email": user.email}`` when the user has a non-empty ``email``, else ``None``."""
    email = getattr(user, "email", None)
    if not email:
        return None
    return {"email": email}


class Identity(NamedTuple):
    """What the app says about a user: an email (unchecked yet) and traits."""

    email: object
    traits: Optional[Mapping[str, Any]]


class Resolver:
    """Who is this user? The identity loader, and the one answer every caller uses."""

    def __init__(self, loader: IdentityLoader = default_identity_loader) -> None:
        self.loader = loader

    def user(self, user: Any) -> Union[Identity, str]:
        """The identity of a user object through the loader, or a skip reason."""
        try:
            traits = self.loader(user)
        except Exception as exc:
            logger.error(
                "flask-koala: the identity loader raised %s; this call is skipped",
                describe_error(exc),
            )
            return "loader_error"
        if traits is None:
            return "no_email" if self.loader is default_identity_loader else "excluded"
        # type() first: isinstance() against an ABC runs Python code, and traits are dicts.
        if type(traits) is not dict and not isinstance(traits, Mapping):
            return "bad_traits"
        email = _email_in(traits)
        if email is None:
            return "bad_traits"
        if not email:
            return "no_email"
        return _new_tuple(Identity, (email, traits))  # Identity(...) is a Python-level __new__

    def result(self, found: object) -> Union[Identity, str, None]:
        """What a ``get_user`` getter returned: a user, an email, a traits dict or ``None``."""
        if found is None:
            return None
        if isinstance(found, str):
            return Identity(found, None) if found else "no_email"
        if isinstance(found, Mapping):
            email = _email_in(found)
            if email is None:
                return "bad_traits"
            return Identity(email, found) if email else "no_email"
        return self.user(found)


def _email_in(traits: Mapping[str, Any]) -> object:
    """``traits["email"]`` (``""`` when absent), or ``None`` when the mapping raised."""
    try:
        return traits.get("email") or ""
    except Exception:  # the app's own mapping type, misbehaving
        return None


class MissingCookiePolicy(Protocol):
    """What an identify does when the request has no usable ``ko_id`` cookie."""

    #: ``False`` for ``"skip"``: the call is skipped with the cookie's reason.
    takes_over: bool

    def handle(self, email: str, traits: dict[str, Any], environ: Environ) -> Union[str, bool]:
        """A visitor id to send with (``"mint"``), or the call's end (``"defer"``).

        ``traits`` are as :func:`clean_traits` copies them on the request thread, dates kept
        (``keep_dates``); a policy that stores them writes them first (``dates_as_text``).
        """
        ...


class _Skip:
    takes_over = False

    def handle(self, email: str, traits: dict[str, Any], environ: Environ) -> Union[str, bool]:
        raise AssertionError("the skip policy never takes over")


SKIP: MissingCookiePolicy = _Skip()


class Pipeline:
    """The request-side path of one app: validate, copy plain values, submit.

    Args:
        config: the app's settings.
        ledger: where skips and drops are counted.
        dispatcher: takes calls while sending is on; ``None`` when the app cannot send.
        suppressed: takes calls while sending is suppressed.
        is_testing: whether the app is testing now (truthy); given when suppression follows it.
        resolver: the identity loader.
        policy: the ``KOALA_MISSING_COOKIE`` policy.
        current_user: the logged-in user of this request, for ``track`` without an email.
    """

    def __init__(
        self,
        config: KoalaConfig,
        ledger: Ledger,
        *,
        dispatcher: Optional[Dispatcher],
        suppressed: Optional[Dispatcher],
        is_testing: Optional[Callable[[], object]],
        resolver: Resolver,
        policy: MissingCookiePolicy = SKIP,
        current_user: Callable[[], Any] = lambda: None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.dispatcher = dispatcher
        self.suppressed = suppressed
        self.resolver = resolver
        self.policy = policy
        self._is_testing = is_testing
        self._current_user = current_user
        self._enabled = config.enabled

    # -- ways in -------------------------------------------------------------------------

    def identify_user(self, user: Any, environ: Optional[Environ], cookie: Optional[str]) -> bool:
        """Identify a logged-in user through the identity loader."""
        if not self._enabled:
            self.ledger.skipped("disabled")
            return False
        found = self.resolver.user(user)
        if isinstance(found, str):
            self.ledger.skipped(found)
            return False
        return self.identify(found.email, found.traits, None, environ, cookie)

    def identify_result(
        self, found: object, environ: Optional[Environ], cookie: Optional[str]
    ) -> bool:
        """Identify what a ``get_user`` getter returned (see :meth:`Resolver.result`)."""
        identity = self.resolver.result(found)
        if identity is None:
            logger.debug("flask-koala: get_user found nobody; not identifying")
            return False
        if isinstance(identity, str):
            self.ledger.skipped(identity)
            return False
        return self.identify(identity.email, identity.traits, None, environ, cookie)

    def identify(
        self,
        email: object,
        traits: Optional[Mapping[str, Any]],
        profile_id: Optional[str],
        environ: Optional[Environ],
        cookie: Optional[str],
    ) -> bool:
        """Validate one identify and hand it on; ``True`` when accepted (or deferred)."""
        ledger = self.ledger
        dispatcher = self._dispatcher()
        if dispatcher is None:
            ledger.skipped("disabled")
            return False
        resolved, reason = self._profile_id(profile_id, environ, cookie)
        policy = self.policy
        if resolved is None and (
            profile_id is not None or environ is None or not policy.takes_over
        ):
            ledger.skipped(reason)
            return False
        clean = clean_email(email)
        if clean is None:
            ledger.skipped("bad_email", profile_id=resolved)
            return False
        plain, size = clean_traits(traits, keep_dates=True)
        if plain is None:
            ledger.skipped("bad_traits", email=clean, profile_id=resolved)
            return False
        if resolved is None:
            assert environ is not None
            handled = policy.handle(clean, plain, environ)
            if isinstance(handled, bool):
                return handled
            resolved = handled
        if _identified(environ, resolved, clean):
            ledger.skipped("duplicate", email=clean, profile_id=resolved)
            return False
        plain["email"] = clean
        bound = body_bound("identify", clean, None, size)
        # The tuple made directly, fields in order: this is the request thread's hottest
        # line, and Call(...) would add a Python-level __new__ to it.
        prefix, number = next_message_id()
        call: Call = _new_tuple(
            Call, ("identify", prefix, number, resolved, clean, time(), plain, None, None, bound)
        )
        if bound > MAX_BODY_BYTES and not fits(call, size):  # only then encode to measure
            ledger.skipped("too_large", email=clean, profile_id=resolved)
            return False
        return self._submit(dispatcher, call, environ)

    def track(
        self,
        event: object,
        properties: Optional[Mapping[str, Any]],
        email: Optional[str],
        profile_id: Optional[str],
        environ: Optional[Environ],
        cookie: Optional[str],
    ) -> bool:
        """Validate one track and hand it on; ``True`` when accepted."""
        ledger = self.ledger
        dispatcher = self._dispatcher()
        if dispatcher is None:
            ledger.skipped("disabled", kind="track")
            return False
        name = clean_event(event)
        if name is None:
            ledger.skipped("bad_event", kind="track")
            return False
        resolved, reason = self._profile_id(profile_id, environ, cookie)
        if resolved is None:
            ledger.skipped(reason, kind="track")
            return False
        found: object = email
        if email is None:
            found, reason = self._current_user_email()
            if reason:
                ledger.skipped(reason, kind="track", profile_id=resolved)
                return False
        clean: Optional[str] = None
        if found is not None:
            clean = clean_email(found)
            if clean is None:
                ledger.skipped("bad_email", kind="track", profile_id=resolved)
                return False
        plain, size = clean_traits(properties, keep_dates=True)
        if plain is None:
            ledger.skipped("bad_properties", kind="track", email=clean, profile_id=resolved)
            return False
        bound = body_bound("track", clean, name, size)
        call = Call.track(
            profile_id=resolved, email=clean, event=name, properties=plain, size=bound
        )
        if bound > MAX_BODY_BYTES and not fits(call, size):  # only then encode to measure
            ledger.skipped("too_large", kind="track", email=clean, profile_id=resolved)
            return False
        return self._submit(dispatcher, call, environ)

    def submit_deferred(self, call: Call, environ: Optional[Environ]) -> bool:
        """Hand on an identify that waited for a cookie (already checked when parked)."""
        ledger = self.ledger
        dispatcher = self._dispatcher()
        email = call.email or ""
        profile_id = call.profile_id or ""
        if dispatcher is None:
            ledger.skipped("disabled", email=email, profile_id=profile_id)
            return False
        if _identified(environ, profile_id, email):
            ledger.skipped("duplicate", email=email, profile_id=profile_id)
            return False
        traits_bound = _traits_size(call.traits)
        if not fits(call, traits_bound):
            ledger.skipped("too_large", email=email, profile_id=profile_id)
            return False
        call = call._replace(size=size_bound(call, traits_bound))
        return self._submit(dispatcher, call, environ)

    def profile_id(self, environ: Optional[Environ], cookie: Optional[str]) -> Optional[str]:
        """The request's validated visitor id (or the one minted for it), or ``None``."""
        if environ is None:
            return None
        return self._profile_id(None, environ, cookie)[0]

    # -- the decisions -------------------------------------------------------------------

    def _dispatcher(self) -> Optional[Dispatcher]:
        """Where a call made now goes: suppression may follow ``app.testing`` live."""
        if self._is_testing is not None and self._is_testing():
            return self.suppressed
        return self.dispatcher if self.dispatcher is not None else self.suppressed

    def _profile_id(
        self, explicit: Optional[str], environ: Optional[Environ], cookie: Optional[str]
    ) -> tuple[Optional[str], str]:
        """The visitor id to send with, or ``None`` and the skip reason."""
        if explicit is not None:
            parsed = parse_profile_id(explicit)
            return (parsed, "bad_cookie") if parsed is None else (parsed, "")
        if environ is None:
            return None, "no_cookie"
        parsed = parse_profile_id(cookie)
        if parsed is None:
            # A visitor id minted earlier in this request stands in for the cookie.
            parsed = environ.get(MINTED_KEY)
        if parsed is not None:
            return parsed, ""
        return None, "no_cookie" if not cookie else "bad_cookie"

    def _current_user_email(self) -> tuple[object, str]:
        """The logged-in user's email through the loader (``None`` for nobody, or for a
        user without one), or ``None`` and the reason an identify of that user is skipped."""
        user = self._current_user()
        if user is None:
            return None, ""
        found = self.resolver.user(user)
        if isinstance(found, str):
            return None, "" if found == "no_email" else found
        return found.email, ""

    def _submit(self, dispatcher: Dispatcher, call: Call, environ: Optional[Environ]) -> bool:
        """The one submit path. While the app answers a request the workers are woken only
        once the response has gone out: a worker woken mid-request would take the GIL from
        it. Elsewhere (no request, or no response to wait for) they are woken at once."""
        wake = None if environ is None else environ.get(WAKE_KEY)
        if wake is None:
            accepted = dispatcher.submit(call)
        else:
            accepted = dispatcher.submit(call, wake=False)
            if accepted:
                wake.add(dispatcher)
        if accepted and environ is not None and call.kind == "identify":
            _mark_identified(environ, call.profile_id or "", call.email or "")
        return accepted


def _identified(environ: Optional[Environ], profile_id: str, email: str) -> bool:
    """Whether this request already had an identify of (visitor, email) accepted."""
    if environ is None:
        return False
    seen: Optional[set[tuple[str, str]]] = environ.get(_IDENTIFIED_KEY)
    return seen is not None and (profile_id, email) in seen


def _mark_identified(environ: Environ, profile_id: str, email: str) -> None:
    seen = environ.get(_IDENTIFIED_KEY)
    if seen is None:
        seen = environ[_IDENTIFIED_KEY] = set()
    seen.add((profile_id, email))


def _traits_size(traits: Optional[Mapping[str, Any]]) -> int:
    _, size = clean_traits(traits)
    return size
