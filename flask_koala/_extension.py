"""The :class:`Koala` extension: its public API and the glue that sets an app up.

The request-side work lives in :mod:`flask_koala._pipeline`, delivery in the dispatchers;
this module only wires them to an app and forwards calls.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, overload

from flask import Flask, has_app_context, has_request_context

from . import _hooks, _identify_login, _missing_cookie, _templating
from ._cli import koala_cli
from ._config import KoalaConfig, load_config
from ._dispatchers import REGISTRY, Dispatcher, Needs
from ._identify_login import UserGetter
from ._ledger import Ledger, internal_error
from ._pipeline import Pipeline, Resolver
from ._state import EXTENSION_KEY, AppState, current_state
from ._transport import HTTPTransport, TransportFactory, check_ca_bundle

__all__ = ["Koala"]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")
if TYPE_CHECKING:
    if sys.version_info >= (3, 10):
        from typing import ParamSpec
    else:
        from typing_extensions import ParamSpec
    P = ParamSpec("P")

logger = logging.getLogger("flask_koala")


class Koala:
    """Tells Koala who the visitor behind the ``ko_id`` cookie is, at every login.

    ``Koala(app)``, or ``Koala()`` then ``init_app(app)`` for app factories; one instance
    may serve several apps, each with its own settings, queue and counters.

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
        self._resolver = Resolver()
        self._transport_factory = transport_factory
        self._celery: Any = None
        if celery is not None:
            self.init_celery(celery)
        if app is not None:
            self.init_app(app)

    # -- setting up ----------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Read and check the ``KOALA_*`` settings and subscribe to Flask-Login's signals.

        Starts no thread and opens no connection: the workers start with the first call.
        Every check runs before the app is changed, so a failed ``init_app`` changes nothing.

        Raises:
            ConfigError: a setting cannot work; the message names the key.
            RuntimeError: the app was initialised already, or has handled a request.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"flask-koala is already initialised on app {app.name!r}; call init_app once "
                "per app (Koala(app) already calls it)."
            )
        if getattr(app, "_got_first_request", False):
            raise RuntimeError(
                f"app {app.name!r} has already handled a request: call koala.init_app(app) "
                "while setting the app up, before it serves anything."
            )
        config = load_config(app.config, testing=app.testing)
        check_ca_bundle(config.ca_bundle)
        _missing_cookie.check_app(app, config)
        # Every check is done: from here on the app is changed, and nothing raises.
        ledger = Ledger(weakref.ref(app), key=config.public_key)
        factory = self._transport_factory or functools.partial(
            HTTPTransport, ca_bundle=config.ca_bundle
        )
        celery_app = self._celery or app.extensions.get("celery")
        pipeline = _build_pipeline(app, config, ledger, self._resolver, factory, celery_app)
        app.extensions[EXTENSION_KEY] = AppState(self, app, config, ledger, pipeline, factory)
        app.cli.add_command(koala_cli)
        _hooks.connect(app, config)
        _missing_cookie.init_app(app, config)
        _templating.init_app(app, config)

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
        default sends ``{"email": user.email}``. An exception in it skips the login
        (``skipped.loader_error``); its type and place are logged, never its message.
        """
        self._resolver.loader = loader
        return loader

    @overload
    def identify_login(self, view: Callable[P, R]) -> Callable[P, R]: ...

    @overload
    def identify_login(
        self, *, get_user: UserGetter
    ) -> Callable[[Callable[P, R]], Callable[P, R]]: ...

    def identify_login(
        self, view: Optional[Callable[..., Any]] = None, *, get_user: Optional[UserGetter] = None
    ) -> Any:
        """Identify whoever a view logged in, once it has returned a response below 400.

        For login views that Flask-Login's signal misses: OAuth and SSO callbacks that never
        call ``login_user``, logins through a request loader. Bare, it identifies
        ``flask_login.current_user`` if authenticated; with ``get_user``, what it returns
        in the request context: a user (through the identity loader), an email, a traits
        dict with ``"email"``, or ``None`` (``get_user`` positionally works too, but only
        the keyword form type-checks)::

            @koala.identify_login
            @koala.identify_login(get_user=load_user)

        Plain and ``async def`` views alike (``get_user`` itself is a plain function); the
        view's name, docstring and signature are kept, and its return value is made a
        response with ``flask.make_response`` to read its status. An exception in the view
        propagates and nothing is sent, not even for a ``login_user`` inside it; anything
        failing in flask-koala afterwards is logged and the response goes out unchanged. A
        view that also calls ``login_user`` sends one identify, not two.
        """
        return _identify_login.decorate(self, view, get_user)

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

        Raises:
            RuntimeError: outside an app context, or on an app this instance did not set
                up (programming errors). Inside a request it never raises.
        """
        pipeline = current_state(self).pipeline
        try:
            environ, cookie = _hooks.request_scope(pipeline.config.cookie_name)
            return pipeline.identify(email, traits, profile_id, environ, cookie)
        except Exception as exc:
            internal_error(pipeline.ledger, exc, "identify")
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

        Raises:
            RuntimeError: as :meth:`identify`.
        """
        pipeline = current_state(self).pipeline
        try:
            environ, cookie = _hooks.request_scope(pipeline.config.cookie_name)
            return pipeline.track(event, properties, email, profile_id, environ, cookie)
        except Exception as exc:
            internal_error(pipeline.ledger, exc, "track", kind="track")
            return False

    def profile_id(self) -> Optional[str]:
        """The current request's validated Koala visitor id, or ``None``.

        For apps that route through Segment (which reads ``traits.profile_id`` on identify
        and ``properties.profile_id`` on track) or RudderStack (the trait
        ``ko_profile_id``). The id minted for this request under ``KOALA_MISSING_COOKIE =
        "mint"`` counts; outside a request there is none.
        """
        if not has_request_context():
            return None
        pipeline = current_state(self).pipeline
        return pipeline.profile_id(*_hooks.request_scope(pipeline.config.cookie_name))

    # -- delivery ------------------------------------------------------------------------

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every call accepted so far (not since) was sent or finally failed.

        Returns:
            ``True`` when none of them is left pending; ``False`` when the timeout ran out
            first, or no worker is alive to finish the rest.
        """
        dispatcher = current_state(self).pipeline.dispatcher
        usable, seconds = _seconds(timeout, "flush")
        return usable and (dispatcher is None or dispatcher.flush(seconds))

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Flush, stop the delivery threads and close connections; later calls are dropped.

        Idempotent; past ``timeout``, a request in flight is cut short (``failed.shutdown``).
        Returns whether everything was delivered before the stop."""
        state = current_state(self)
        usable, seconds = _seconds(timeout, "shutdown")
        return usable and state.shutdown(seconds)

    @property
    def stats(self) -> Mapping[str, int]:
        """Read-only counters of the current app: ``queued``, ``sent``, ``failed``,
        ``dropped``, ``skipped``, ``retried``, ``suppressed``, ``published`` (Celery mode),
        ``pending``, ``deferred`` (``KOALA_MISSING_COOKIE = "defer"``), each from the start,
        and one ``<outcome>.<reason>`` entry per reason seen (``skipped.no_cookie``, ...)."""
        return current_state(self).ledger.snapshot()

    @property
    def config(self) -> KoalaConfig:
        """The current app's effective settings."""
        return current_state(self).config

    @contextlib.contextmanager
    def record_calls(self) -> Iterator[list[dict[str, Any]]]:
        """Collect the body of every call the current app accepts inside the block; outside
        an app context, of every app this instance set up.

        Works with sending suppressed and with sending on; each body is a dict exactly as
        it would be sent (a call alone, before any merging with others about the same
        person).
        """
        app = current_state(self).app_ref() if has_app_context() else None
        with _hooks.record_calls(app, owner=self) as calls:
            yield calls


def _build_pipeline(
    app: Flask,
    config: KoalaConfig,
    ledger: Ledger,
    resolver: Resolver,
    transport_factory: TransportFactory,
    celery_app: Any,
) -> Pipeline:
    """The request-side path of one app, with the dispatchers its settings ask for."""
    sends = config.enabled and not (config.suppress_send and not config.suppress_follows_testing)
    return Pipeline(
        config,
        ledger,
        dispatcher=_make_dispatcher(config, ledger, transport_factory, celery_app)
        if sends and config.public_key is not None
        else None,
        suppressed=REGISTRY["suppressed"](config, Needs(ledger, transport_factory))
        if config.enabled
        else None,
        # app.testing, read live: it is app.config["TESTING"]; the config does not keep the
        # app alive, and a C-level get costs the request thread least.
        is_testing=functools.partial(app.config.get, "TESTING", False)
        if config.suppress_follows_testing
        else None,
        resolver=resolver,
        policy=_missing_cookie.policy_for(config, ledger),
        current_user=_hooks.current_user,
    )


def _make_dispatcher(
    config: KoalaConfig,
    ledger: Ledger,
    transport_factory: TransportFactory,
    celery_app: Any = None,
) -> Dispatcher:
    """The dispatcher that sends: the one ``KOALA_DISPATCHER`` or ``KOALA_SYNC`` names."""
    return REGISTRY[config.sending_mode](config, Needs(ledger, transport_factory, celery_app))


def _seconds(timeout: Optional[float], method: str) -> tuple[bool, Optional[float]]:
    """``(True, timeout)`` for seconds or ``None``, checked alike in every mode (some never
    look at it). NaN is refused too: no deadline ever passes it, so a wait on it would never end.

    A refused timeout is a programming error and raises ``TypeError``, except inside a
    request, which nothing of flask-koala's raises into: there it is logged at ERROR and
    answered ``(False, None)``, and ``method`` neither waits nor stops anything.
    """
    if timeout is None:
        return True, timeout
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        if not math.isnan(timeout):
            return True, timeout
        what = "nan"
    else:
        what = type(timeout).__name__
    if has_request_context():
        logger.error(
            "flask-koala: %s() was given a timeout that is not a number of seconds or None "
            "(%s); it returns False without waiting",
            method,
            what,
        )
        return False, None
    raise TypeError(f"timeout must be a number of seconds or None, not {what}")
