"""The Flask glue: settings, Flask-Login's signals, and the request-side half of a call.

Work done here, on the request thread, is limited to reading the cookie, validating,
copying plain values and handing a :class:`~flask_koala._payload.Call` to the app's
dispatcher. Everything that can be slow or fail happens off-thread, and nothing here lets
an exception reach the login.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional, TypeVar

from flask import (
    Flask,
    Request,
    Response,
    current_app,
    has_app_context,
    has_request_context,
    request,
)
from flask_login import user_loaded_from_cookie, user_logged_in

from . import _identify_login, _missing_cookie, _templating, signals
from ._cli import koala_cli
from ._config import KoalaConfig, load_config
from ._cookies import parse_profile_id
from ._dispatchers import Dispatcher, Needs, make_dispatcher
from ._ledger import Ledger
from ._payload import Call, clean_email, clean_event, clean_traits, fits
from ._transport import HTTPTransport, TransportFactory

__all__ = ["Koala"]

logger = logging.getLogger("flask_koala")

IdentityLoader = Callable[[Any], Optional[Mapping[str, Any]]]
F = TypeVar("F", bound=Callable[..., Any])

_EXTENSION_KEY = "koala"
# The dispatchers a request queued calls on, to wake once its response is out.
_WAKE_KEY = "flask_koala.wake"
_IDENTIFIED_KEY = "flask_koala.identified"


def default_identity_loader(user: Any) -> Optional[dict[str, Any]]:
    """``{"email": user.email}`` when the user has a non-empty ``email``, else ``None``."""
    email = getattr(user, "email", None)
    if not email:
        return None
    return {"email": email}


class _KoalaState:
    """What one app needs: its settings, its ledger and its dispatcher."""

    __slots__ = ("__weakref__", "app_ref", "config", "dispatcher", "extension", "ledger")

    def __init__(
        self,
        extension: Koala,
        app: Flask,
        config: KoalaConfig,
        transport_factory: TransportFactory,
    ) -> None:
        self.extension = extension
        self.config = config
        self.app_ref = weakref.ref(app)
        self.ledger = Ledger(self.app_ref)
        celery_app = extension._celery or app.extensions.get("celery")
        self.dispatcher = _make_dispatcher(config, self.ledger, transport_factory, celery_app)

    def submit(self, call: Call, req: Optional[Request] = None) -> bool:
        """Hand an accepted call to the dispatcher; ``req`` is the current request, if any.

        Inside a request the workers are woken only once the response has gone out (or
        at teardown, for a request that ended in an exception): a worker woken mid-request
        would take the GIL from the login it came from.
        """
        dispatcher = self.dispatcher
        assert dispatcher is not None  # callers skip disabled apps first
        if req is None:
            return dispatcher.submit(call)
        accepted = dispatcher.submit(call, wake=False)
        if accepted:
            req.environ.setdefault(_WAKE_KEY, set()).add(dispatcher)
        return accepted


def _make_dispatcher(
    config: KoalaConfig,
    ledger: Ledger,
    transport_factory: TransportFactory,
    celery_app: Any = None,
) -> Optional[Dispatcher]:
    return make_dispatcher(config, Needs(ledger, transport_factory, celery_app))


class Koala:
    """Tells Koala who the visitor behind the ``ko_id`` cookie is, at every login.

    ``Koala(app)``, or ``Koala()`` then ``init_app(app)`` for app factories; one instance
    may serve several apps, each with its own settings, queue and counters in
    ``app.extensions["koala"]``.

    Args:
        app: initialise this app right away.
        transport_factory: makes the object that posts to Koala, one per delivery thread;
            tests may hand in their own. Defaults to keep-alive HTTP.
        celery: the Celery app for ``KOALA_DISPATCHER = "celery"``; see :meth:`init_celery`.
    """

    def __init__(
        self,
        app: Optional[Flask] = None,
        *,
        transport_factory: Optional[TransportFactory] = None,
        celery: Any = None,
    ) -> None:
        self._identity_loader: IdentityLoader = default_identity_loader
        self._transport_factory: TransportFactory = transport_factory or HTTPTransport
        self._celery: Any = None
        if celery is not None:
            self.init_celery(celery)
        if app is not None:
            self.init_app(app)

    # -- setting up ----------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Read and check the ``KOALA_*`` settings and subscribe to Flask-Login's signals.

        Starts no thread and opens no connection: the workers start with the first call.

        Raises:
            ConfigError: a setting cannot work; the message names the key.
            RuntimeError: the app was initialised already.
        """
        if _EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"flask-koala is already initialised on app {app.name!r}; call init_app once "
                "per app (Koala(app) already calls it)."
            )
        config = load_config(app.config, testing=app.testing)
        _missing_cookie.check_app(app, config)
        # Every check is done: from here on the app is changed, and nothing raises.
        app.extensions[_EXTENSION_KEY] = _KoalaState(self, app, config, self._transport_factory)
        app.cli.add_command(koala_cli)
        # Module-level receivers with sender=app: blinker holds receivers weakly, and a
        # closure made here would silently stop firing once collected.
        if config.identify_on_login:
            user_logged_in.connect(_on_user_logged_in, sender=app)
        if config.identify_on_remember:
            user_loaded_from_cookie.connect(_on_user_loaded_from_cookie, sender=app)
        _missing_cookie.init_app(app, config)
        _templating.init_app(app, config)
        if config.mode not in ("disabled", "suppressed", "sync"):
            app.after_request(_wake_after_response)
            app.teardown_request(_wake_at_teardown)

    def init_celery(self, celery_app: Any) -> None:
        """Use this Celery app in celery mode, and register the delivery task on it.

        Call it before :meth:`init_app` (or pass ``Koala(app, celery=celery_app)``); an app
        that keeps its Celery app in ``app.extensions["celery"]``, as Flask's Celery guide
        does, needs neither. The task, ``flask_koala.deliver``, is registered even while
        ``KOALA_DISPATCHER`` is ``"thread"``, so a worker built from the same module can run it.
        """
        from .celery import register_task

        register_task(celery_app)
        self._celery = celery_app

    def identity_loader(self, loader: F) -> F:
        """Register ``loader(user) -> dict | None``: the traits to send for a user.

        The dict must hold ``"email"``; ``None`` means "do not identify this user". The
        default sends ``{"email": user.email}``.
        """
        self._identity_loader = loader
        return loader

    def identify_login(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """Identify whoever a view logged in, once it has returned a response below 400.

        For login views that Flask-Login's signal misses: OAuth and SSO callbacks that never
        call ``login_user``, logins through a request loader. Two forms::

            @koala.identify_login            # flask_login.current_user, if authenticated
            @koala.identify_login(get_user)  # get_user() in the request context returns a
                                             # user (through the identity loader), an email,
                                             # a traits dict with "email", or None

        Plain and ``async def`` views alike (``get_user`` itself is a plain function); the
        name and docstring are kept. The view's
        return value is made a response with ``flask.make_response`` to read its status.
        An exception in the view propagates and nothing is sent; anything failing inside
        flask-koala afterwards is logged and the response goes out unchanged. A view that
        also calls ``login_user`` sends one identify, not two.
        """
        return _identify_login.identify_login(self, func)

    # -- calls ---------------------------------------------------------------------------

    def identify(
        self,
        email: str,
        traits: Optional[Mapping[str, Any]] = None,
        *,
        profile_id: Optional[str] = None,
    ) -> bool:
        """Accept one identify call for delivery.

        Args:
            email: who the visitor is.
            traits: more about them; ``"email"`` in it is replaced by ``email``.
            profile_id: the Koala visitor id; defaults to the current request's cookie.

        Returns:
            ``True`` when the call was accepted (or, with ``KOALA_MISSING_COOKIE = "defer"``,
            parked in the session until the visitor has a cookie), ``False`` when it was
            skipped or dropped (the reason is counted in :attr:`stats` and logged at DEBUG).
        """
        state = self._state()
        try:
            return self._identify(state, email, traits, profile_id)
        except Exception:
            logger.exception("flask-koala: identify failed unexpectedly")
            return False

    def track(
        self,
        event: str,
        properties: Optional[Mapping[str, Any]] = None,
        *,
        email: Optional[str] = None,
        profile_id: Optional[str] = None,
    ) -> bool:
        """Accept one server-side custom event for delivery.

        Args:
            event: the event name, a non-empty string.
            properties: about the event; checked like traits.
            email: defaults to the logged-in user's, through the identity loader.
            profile_id: defaults to the current request's cookie.

        Returns:
            ``True`` when accepted, ``False`` when skipped or dropped.
        """
        state = self._state()
        try:
            return self._track(state, event, properties, email, profile_id)
        except Exception:
            logger.exception("flask-koala: track failed unexpectedly")
            return False

    def profile_id(self) -> Optional[str]:
        """The current request's validated Koala visitor id, or ``None``.

        For apps that route through Segment (which reads ``traits.profile_id`` on identify
        and ``properties.profile_id`` on track) or RudderStack (the trait
        ``ko_profile_id``). The id minted for this request under ``KOALA_MISSING_COOKIE =
        "mint"`` counts; outside a request there is none.
        """
        state = self._state()
        req = _current_request()
        if req is None:
            return None
        return self._resolve_profile_id(state, None, req)[0]

    # -- delivery ------------------------------------------------------------------------

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every call accepted so far was sent or finally failed.

        Returns:
            ``True`` when nothing is left pending; ``False`` when the timeout ran out first,
            or no worker is alive to finish the rest.
        """
        dispatcher = self._state().dispatcher
        return True if dispatcher is None else dispatcher.flush(timeout)

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Flush, stop the delivery threads and close connections; later calls are dropped.

        Idempotent. Returns whether everything was delivered before the stop.
        """
        dispatcher = self._state().dispatcher
        return True if dispatcher is None else dispatcher.shutdown(timeout)

    @property
    def stats(self) -> Mapping[str, int]:
        """Read-only counters of the current app: ``queued``, ``sent``, ``failed``,
        ``dropped``, ``skipped``, ``retried``, ``suppressed``, ``pending``, and one
        ``<outcome>.<reason>`` entry per reason seen (``skipped.no_cookie``, ...)."""
        return self._state().ledger.snapshot()

    @property
    def config(self) -> KoalaConfig:
        """The current app's effective settings."""
        return self._state().config

    @contextlib.contextmanager
    def record_calls(self) -> Iterator[list[dict[str, Any]]]:
        """Collect the body of every call the current app accepts inside the block.

        Works with sending suppressed and with sending on; each body is a dict exactly as
        it would be sent (a call alone, before any merging with others about the same
        person).
        """
        app = self._state().app_ref()
        calls: list[dict[str, Any]] = []

        def record(sender: object, **extra: Any) -> None:
            calls.append(extra["body"])

        # connect/disconnect by hand: blinker < 1.7's connected_to() leaves the receiver
        # connected when the block ends by GeneratorExit (a fixture torn down by close()).
        signals.call_accepted.connect(record, sender=app, weak=False)
        try:
            yield calls
        finally:
            signals.call_accepted.disconnect(record, sender=app)

    # -- internals -----------------------------------------------------------------------

    def _state(self) -> _KoalaState:
        if not has_app_context():
            raise RuntimeError(
                "flask-koala needs an application context: call it inside a request, a CLI "
                "command, or `with app.app_context():`."
            )
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        state = app.extensions.get(_EXTENSION_KEY)
        if state is None:
            raise RuntimeError(
                f"flask-koala is not initialised on app {app.name!r}: call "
                "koala.init_app(app) (or Koala(app)) in your app factory."
            )
        if state.extension is not self:
            raise RuntimeError(
                f"app {app.name!r} was initialised by another Koala instance; use that one."
            )
        return state  # type: ignore[no-any-return]

    def _identify_user(self, state: _KoalaState, user: Any) -> bool:
        """Identify a Flask-Login user through the identity loader."""
        if not state.config.enabled:
            state.ledger.skipped("disabled")
            return False
        try:
            traits = self._identity_loader(user)
        except Exception:
            logger.exception("flask-koala: the identity loader raised; this login is skipped")
            state.ledger.skipped("loader_error")
            return False
        if traits is None:
            is_default = self._identity_loader is default_identity_loader
            state.ledger.skipped("no_email" if is_default else "excluded")
            return False
        if not isinstance(traits, Mapping):
            state.ledger.skipped("bad_traits")
            return False
        email = traits.get("email")
        if not email:
            state.ledger.skipped("no_email")
            return False
        return self._identify(state, email, traits, None)

    def _identify(
        self,
        state: _KoalaState,
        email: object,
        traits: Optional[Mapping[str, Any]],
        profile_id: Optional[str],
    ) -> bool:
        ledger = state.ledger
        if state.dispatcher is None:
            ledger.skipped("disabled")
            return False
        req = _current_request()
        resolved, reason = self._resolve_profile_id(state, profile_id, req)
        policy = None
        if resolved is None:
            if profile_id is not None or not _missing_cookie.applies(state.config, reason):
                ledger.skipped(reason)
                return False
            policy = state.config.missing_cookie
        clean = clean_email(email)
        if clean is None:
            ledger.skipped("bad_email", profile_id=resolved)
            return False
        plain, size = clean_traits(traits)
        if plain is None:
            ledger.skipped("bad_traits", email=clean, profile_id=resolved)
            return False
        if policy == "defer":
            return _missing_cookie.defer(state, clean, plain)
        if resolved is None:  # "mint"
            resolved = _missing_cookie.mint(state.config)
        if _already_identified(req, resolved, clean):
            ledger.skipped("duplicate", email=clean, profile_id=resolved)
            return False
        plain["email"] = clean
        call = Call.identify(profile_id=resolved, email=clean, traits=plain)
        if not fits(call, size + len(clean)):
            ledger.skipped("too_large", email=clean, profile_id=resolved)
            return False
        return state.submit(call, req)

    def _track(
        self,
        state: _KoalaState,
        event: object,
        properties: Optional[Mapping[str, Any]],
        email: Optional[str],
        profile_id: Optional[str],
    ) -> bool:
        ledger = state.ledger
        if state.dispatcher is None:
            ledger.skipped("disabled", kind="track")
            return False
        name = clean_event(event)
        if name is None:
            ledger.skipped("bad_event", kind="track")
            return False
        req = _current_request()
        resolved, reason = self._resolve_profile_id(state, profile_id, req)
        if resolved is None:
            ledger.skipped(reason, kind="track")
            return False
        if email is None:
            email = self._current_user_email()
        clean: Optional[str] = None
        if email is not None:
            clean = clean_email(email)
            if clean is None:
                ledger.skipped("bad_email", kind="track", profile_id=resolved)
                return False
        plain, size = clean_traits(properties)
        if plain is None:
            ledger.skipped("bad_properties", kind="track", email=clean, profile_id=resolved)
            return False
        call = Call.track(profile_id=resolved, email=clean, event=name, properties=plain)
        if not fits(call, size + len(name)):
            ledger.skipped("too_large", kind="track", email=clean, profile_id=resolved)
            return False
        return state.submit(call, req)

    def _resolve_profile_id(
        self, state: _KoalaState, explicit: Optional[str], req: Optional[Request]
    ) -> tuple[Optional[str], str]:
        """The visitor id to send with, or ``None`` and the skip reason."""
        if explicit is not None:
            parsed = parse_profile_id(explicit)
            return (parsed, "bad_cookie") if parsed is None else (parsed, "")
        if req is None:
            return None, "no_cookie"
        raw = req.cookies.get(state.config.cookie_name)
        parsed = parse_profile_id(raw)
        if parsed is None:
            # A visitor id minted earlier in this request stands in for the cookie.
            parsed = _missing_cookie.minted_profile_id()
        if parsed is not None:
            return parsed, ""
        return None, "no_cookie" if raw is None or raw == "" else "bad_cookie"

    def _current_user_email(self) -> Optional[str]:
        """The logged-in user's email through the identity loader, if any."""
        if not has_request_context() or getattr(current_app, "login_manager", None) is None:
            return None
        from flask_login import current_user

        if not getattr(current_user, "is_authenticated", False):
            return None
        try:
            traits = self._identity_loader(current_user)
        except Exception:
            logger.exception("flask-koala: the identity loader raised")
            return None
        if not isinstance(traits, Mapping):
            return None
        email = traits.get("email")
        return email if isinstance(email, str) else None


def _current_request() -> Optional[Request]:
    """The request being handled, looked up once per call (the proxy is not free)."""
    if not has_request_context():
        return None
    return request._get_current_object()  # type: ignore[attr-defined,no-any-return]


def _already_identified(req: Optional[Request], profile_id: str, email: str) -> bool:
    """At most one identify per (visitor, email) per request; records this one."""
    if req is None:
        return False
    # In the WSGI environ, not ``g``: ``g`` belongs to the app context, which several
    # requests share when one was pushed around them.
    seen: Optional[set[tuple[str, str]]] = req.environ.get(_IDENTIFIED_KEY)
    if seen is None:
        seen = req.environ[_IDENTIFIED_KEY] = set()
    key = (profile_id, email)
    if key in seen:
        return True
    seen.add(key)
    return False


def _wake_after_response(response: Response) -> Response:
    """Wake the workers once the server has sent the response and closed it."""
    dispatchers = request.environ.pop(_WAKE_KEY, None)
    if dispatchers:
        for dispatcher in dispatchers:
            response.call_on_close(dispatcher.wake)
    return response


def _wake_at_teardown(exc: Optional[BaseException]) -> None:
    """A request that skipped ``after_request`` (an unhandled error) wakes them here."""
    for dispatcher in request.environ.pop(_WAKE_KEY, ()):
        dispatcher.wake()


def _state_of(app: Any) -> Optional[_KoalaState]:
    extensions = getattr(app, "extensions", None)
    return None if extensions is None else extensions.get(_EXTENSION_KEY)


def _on_user_logged_in(sender: Any, user: Any = None, **extra: Any) -> None:
    """Flask-Login's ``user_logged_in``: identify the user who just logged in."""
    _identify_signalled(sender, user)


def _on_user_loaded_from_cookie(sender: Any, user: Any = None, **extra: Any) -> None:
    """Flask-Login's ``user_loaded_from_cookie``: a remember-me login is a login too."""
    _identify_signalled(sender, user)


def _identify_signalled(app: Any, user: Any) -> None:
    try:
        state = _state_of(app)
        if state is not None:
            state.extension._identify_user(state, user)
    except Exception:
        logger.exception("flask-koala: identifying a login failed; the login goes on")
