"""``@koala.identify_login``: identify after a login view that Flask-Login's signal misses.

Many OAuth and SSO callbacks never call ``login_user`` (or log in through a request loader,
which sends no signal). Decorating the view identifies whoever it logged in once it has
returned a response below 400. Both forms are one call with one callable, so they are told
apart when the result is called: Flask calls a view with keyword arguments only, while
decorating calls it with exactly one positional callable.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional

from flask import Response, current_app, make_response
from flask_login import current_user

from ._ledger import describe_error

if TYPE_CHECKING:
    from ._extension import Koala

__all__ = ["identify_login"]

logger = logging.getLogger("flask_koala")

UserGetter = Callable[[], Any]


def identify_login(koala: Koala, func: Callable[..., Any]) -> Callable[..., Any]:
    """``koala.identify_login(view)`` or ``koala.identify_login(get_user)(view)``."""
    if inspect.iscoroutinefunction(func):
        # ``get_user`` is called plainly, so a coroutine function can only be a view.
        return _wrap(koala, func, None)
    bare = _wrap(koala, func, None)

    @functools.wraps(func)
    def view_or_decorator(*args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]):
            return _wrap(koala, args[0], func)
        return bare(*args, **kwargs)

    return view_or_decorator


def _wrap(
    koala: Koala, view: Callable[..., Any], get_user: Optional[UserGetter]
) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(view):

        @functools.wraps(view)
        async def async_login_view(*args: Any, **kwargs: Any) -> Response:
            response = make_response(await view(*args, **kwargs))
            _identify_after(koala, response, get_user)
            return response

        return async_login_view

    @functools.wraps(view)
    def login_view(*args: Any, **kwargs: Any) -> Response:
        response = make_response(view(*args, **kwargs))
        _identify_after(koala, response, get_user)
        return response

    return login_view


def _identify_after(koala: Koala, response: Response, get_user: Optional[UserGetter]) -> None:
    """Identify who the view logged in; never raises into the response."""
    if response.status_code >= 400:
        logger.debug("flask-koala: login view answered %d; not identifying", response.status_code)
        return
    try:
        state = koala._state()
        if get_user is None:
            user = _current_user()
            if user is None:
                logger.debug("flask-koala: login view left nobody logged in; not identifying")
                return
            koala._identify_user(state, user)
            return
        try:
            result = get_user()
        except Exception as exc:  # its message may hold the email: type and place only
            logger.error("flask-koala: get_user raised %s; login skipped", describe_error(exc))
            state.ledger.skipped("loader_error")
            return
        if result is None:
            logger.debug("flask-koala: get_user found nobody; not identifying")
        elif isinstance(result, str):
            koala._identify(state, result, None, None)
        elif isinstance(result, Mapping):
            email = result.get("email")
            if not email:
                state.ledger.skipped("no_email")
                return
            koala._identify(state, email, result, None)
        else:
            koala._identify_user(state, result)
    except Exception:
        logger.exception("flask-koala: identifying after a login view failed; the response goes on")


def _current_user() -> Any:
    """Flask-Login's current user when authenticated, else ``None``."""
    if getattr(current_app, "login_manager", None) is None:
        return None
    if not current_user.is_authenticated:
        return None
    return current_user._get_current_object()
