"""What flask-koala hooks into an app, and what it reads of the current request.

Flask-Login's signals and the wake after the response are connected here, with module-level
receivers and ``sender=app``: blinker holds receivers weakly, and a closure made in
``init_app`` would silently stop firing once collected.

The wake is a thin WSGI layer around ``app.wsgi_app`` rather than ``after_request`` and
``teardown_request`` hooks: Flask runs every hook on every request (and checks each one for
a coroutine first), while the layer costs a request that queued nothing one call and two
dict operations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Optional

from blinker import ANY
from flask import Flask, current_app, has_request_context, request
from flask_login import current_user as proxy
from flask_login import user_loaded_from_cookie, user_logged_in

from . import signals
from ._config import KoalaConfig
from ._ledger import internal_error
from ._pipeline import WAKE_KEY, Environ
from ._state import state_of

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from ._dispatchers import Dispatcher

__all__ = ["HELD_KEY", "connect", "current_user", "record_calls", "request_scope"]

#: Set by ``@koala.identify_login`` while its view runs: the users Flask-Login reports logged
#: in meanwhile wait in this list until the view's status is known (see ``_identify_login``).
HELD_KEY = "flask_koala.held_logins"


def connect(app: Flask, config: KoalaConfig) -> None:
    """Subscribe to the logins the settings ask for, and wake workers after responses."""
    if config.identify_on_login:
        user_logged_in.connect(_on_login, sender=app)
    if config.identify_on_remember:
        user_loaded_from_cookie.connect(_on_login, sender=app)
    if config.mode not in ("disabled", "sync"):
        app.wsgi_app = _waking_after_response(app.wsgi_app)  # type: ignore[method-assign,assignment]


def request_scope(cookie_name: str) -> tuple[Optional[Environ], Optional[str]]:
    """The current request's WSGI environ and ``cookie_name`` cookie; ``None`` outside one."""
    try:
        req = request._get_current_object()  # type: ignore[attr-defined]
    except RuntimeError:  # outside a request: the one context lookup tells
        return None, None
    # Werkzeug keeps the parsed cookies in the request's __dict__ once read (the session
    # read them); taken from there, they skip a Python-level descriptor on every call.
    cookies = req.__dict__.get("cookies")
    if cookies is None:
        cookies = req.cookies
    return req.environ, cookies.get(cookie_name)


def current_user() -> Any:
    """Flask-Login's logged-in user of this request, or ``None``."""
    if not has_request_context() or getattr(current_app, "login_manager", None) is None:
        return None
    if not getattr(proxy, "is_authenticated", False):
        return None
    return proxy._get_current_object()


def _on_login(sender: Any, user: Any = None, **extra: Any) -> None:
    """``user_logged_in`` and ``user_loaded_from_cookie`` (a remember-me login)."""
    state = None
    try:
        state = state_of(sender)
        if state is not None:
            environ, cookie = request_scope(state.config.cookie_name)
            held = None if environ is None else environ.get(HELD_KEY)
            if held is not None:
                held.append(user)
            else:
                state.pipeline.identify_user(user, environ, cookie)
    except Exception as exc:
        internal_error(None if state is None else state.ledger, exc, "identifying a login")


def _waking_after_response(wsgi_app: WSGIApplication) -> WSGIApplication:
    """``wsgi_app``, waking the workers a request queued calls on once the server has sent
    its response and closed it (or at once, when the app raised instead of answering).

    While the app runs, ``environ[WAKE_KEY]`` collects those dispatchers (the pipeline
    adds them); once it has answered, the key is gone, and a call made later (a streamed
    body, a request context pushed by hand) wakes the workers itself.
    """

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ[WAKE_KEY] = set()
        try:
            body = wsgi_app(environ, start_response)
        except BaseException:
            _wake(environ.pop(WAKE_KEY, ()))
            raise
        dispatchers = environ.pop(WAKE_KEY, None)
        if not dispatchers:
            return body
        return _WakingBody(body, dispatchers)

    return serve


class _WakingBody:
    """A response body that wakes the workers once the server has closed it.

    Iterating it iterates the app's own body, so a chunk costs nothing more; werkzeug's
    ``ClosingIterator`` would add a Python call a chunk, and evaluates typing hints each
    time one is made, on the way out of every login.
    """

    __slots__ = ("_body", "_dispatchers")

    def __init__(self, body: Iterable[bytes], dispatchers: Iterable[Dispatcher]) -> None:
        self._body = body
        self._dispatchers = dispatchers

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            _wake(self._dispatchers)


def _wake(dispatchers: Iterable[Dispatcher]) -> None:
    for dispatcher in dispatchers:
        dispatcher.wake()


@contextlib.contextmanager
def record_calls(
    app: Optional[Flask], owner: Optional[object] = None
) -> Iterator[list[dict[str, Any]]]:
    """Collect the body of every call ``app`` accepts inside the block (``call_accepted``);
    with ``app=None``, of every app the :class:`~flask_koala.Koala` ``owner`` set up.

    Each body is a dict exactly as it would be sent (a call alone, before any merging with
    others about the same person), with sending suppressed or on alike.
    """
    calls: list[dict[str, Any]] = []

    def record(sender: object, **extra: Any) -> None:
        if app is not None or getattr(state_of(sender), "owner", None) is owner:
            calls.append(extra["body"])

    # connect/disconnect by hand: blinker < 1.7's connected_to() leaves the receiver
    # connected when the block ends by GeneratorExit (a fixture torn down by close()).
    sender = ANY if app is None else app
    signals.call_accepted.connect(record, sender=sender, weak=False)
    try:
        yield calls
    finally:
        signals.call_accepted.disconnect(record, sender=sender)
