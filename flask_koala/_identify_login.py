"""``@koala.identify_login``: identify after a login view that Flask-Login's signal misses.

Many OAuth and SSO callbacks never call ``login_user`` (or log in through a request loader,
which sends no signal). Decorating the view identifies whoever it logged in once it has
returned a response below 400. The form is decided when decorating: bare, the logged-in
Flask-Login user; with ``get_user=``, whoever that getter returns. A login the view makes
itself through ``login_user`` waits for the same verdict (:data:`~._hooks.HELD_KEY`).

The getter may also be passed positionally, ``@koala.identify_login(get_user)``: taken for a
view at first, it is told apart when that "view" is applied to the real one, at import,
outside any request (a view only ever runs inside one).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, Optional, TypeVar

from flask import Response, has_request_context, make_response, request

from ._hooks import HELD_KEY, current_user, request_scope
from ._ledger import describe_error, internal_error
from ._state import current_state

__all__ = ["UserGetter", "decorate"]

logger = logging.getLogger("flask_koala")

#: Called in the request context after the view: a user (through the identity loader), an
#: email, a traits dict with ``"email"``, or ``None`` for nobody.
UserGetter = Callable[[], Any]
V = TypeVar("V", bound=Callable[..., Any])


def decorate(owner: object, view: Optional[V], get_user: Optional[UserGetter]) -> Any:
    """``view`` wrapped, or (``view`` is ``None``) a decorator that wraps one."""
    if view is None:
        if get_user is None:
            raise TypeError("identify_login() takes a view, or get_user= to decorate one with")
        return functools.partial(_wrap, owner, get_user=get_user)
    if get_user is not None:
        raise TypeError("identify_login(view, get_user=...): pass get_user alone, then the view")
    if not callable(view):
        raise TypeError(f"identify_login() decorates a view function, not {view!r}")
    return _wrap(owner, view, get_user=None)


def _wrap(owner: object, view: V, *, get_user: Optional[UserGetter]) -> V:
    if inspect.iscoroutinefunction(view):

        @functools.wraps(view)
        async def async_login_view(*args: Any, **kwargs: Any) -> Response:
            held = _hold()
            try:
                response = make_response(await view(*args, **kwargs))
            except BaseException:
                _release(owner, held, None)
                raise
            return _after(owner, held, response, get_user)

        return async_login_view  # type: ignore[return-value]

    @functools.wraps(view)
    def login_view(*args: Any, **kwargs: Any) -> Response:
        if get_user is None and _decorating(args, kwargs):
            # @koala.identify_login(get_user): ``view`` is the getter, args[0] the view.
            return _wrap(owner, args[0], get_user=view)  # type: ignore[no-any-return]
        held = _hold()
        try:
            response = make_response(view(*args, **kwargs))
        except BaseException:
            _release(owner, held, None)
            raise
        return _after(owner, held, response, get_user)

    return login_view  # type: ignore[return-value]


def _after(
    owner: object, held: Optional[list[Any]], response: Response, get_user: Optional[UserGetter]
) -> Response:
    """The view answered: identify the logins it made, then whoever the decorator names."""
    _release(owner, held, response.status_code)
    _identify_after(owner, response, get_user)
    return response


def _hold() -> Optional[list[Any]]:
    """Hold the logins Flask-Login reports while the view runs (``login_user`` in an OAuth
    callback) until its status is known; ``None`` when a decorated view around it holds them,
    or when the view is called outside a request (a unit test calling it directly).
    """
    if not has_request_context():
        return None
    environ = request.environ
    if HELD_KEY in environ:
        return None
    held: list[Any] = []
    environ[HELD_KEY] = held
    return held


def _release(owner: object, held: Optional[list[Any]], status: Optional[int]) -> None:
    """Identify the held logins once the view answered below 400; otherwise (an error status,
    or ``status`` is ``None``: the view raised) count them ``skipped.view_failed``. Never
    raises: an exception in the view must propagate unchanged."""
    if held is None:
        return
    pipeline = None
    try:
        request.environ.pop(HELD_KEY, None)
        if not held:
            return
        pipeline = current_state(owner).pipeline
        if status is None or status >= 400:
            logger.debug(
                "flask-koala: login view %s; not identifying its login",
                "raised" if status is None else f"answered {status}",
            )
            for _ in held:
                pipeline.ledger.skipped("view_failed")
            return
        environ, cookie = request_scope(pipeline.config.cookie_name)
        for user in held:
            pipeline.identify_user(user, environ, cookie)
    except Exception as exc:
        ledger = None if pipeline is None else pipeline.ledger
        internal_error(ledger, exc, "identifying the logins of a login view")


def _decorating(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a bare-form wrapper is being applied to a view rather than serving a request."""
    return len(args) == 1 and not kwargs and callable(args[0]) and not has_request_context()


def _identify_after(owner: object, response: Response, get_user: Optional[UserGetter]) -> None:
    """Identify who the view logged in; never raises into the response."""
    if response.status_code >= 400:
        logger.debug("flask-koala: login view answered %d; not identifying", response.status_code)
        return
    pipeline = None
    try:
        pipeline = current_state(owner).pipeline
        environ, cookie = request_scope(pipeline.config.cookie_name)
        if get_user is None:
            user = current_user()
            if user is None:
                logger.debug("flask-koala: login view left nobody logged in; not identifying")
                return
            pipeline.identify_user(user, environ, cookie)
            return
        try:
            found = get_user()
        except Exception as exc:
            logger.error(
                "flask-koala: get_user raised %s; this login is skipped", describe_error(exc)
            )
            pipeline.ledger.skipped("loader_error")
            return
        pipeline.identify_result(found, environ, cookie)
    except Exception as exc:
        ledger = None if pipeline is None else pipeline.ledger
        internal_error(ledger, exc, "identifying after a login view")
