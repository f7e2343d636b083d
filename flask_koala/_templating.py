"""The Flask side of the browser pixel: ``koala_script()`` in templates, the reset after a
logout, and the optional insertion of the snippet into HTML pages.

The markup itself and its escaping live in :mod:`flask_koala._snippet`; this module only
gathers the request's values for it. Nothing here may break a page: a failure is logged and
the page is served without the snippet.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Union

from flask import Flask, Response, current_app, has_app_context, has_request_context, session
from flask_login import user_logged_out
from markupsafe import Markup

from ._hooks import current_user
from ._ledger import describe_error, log_unexpected
from ._payload import clean_email, clean_traits
from ._pipeline import Identity, Resolver
from ._snippet import MARKER, default_sdk_url, render_snippet
from ._state import state_of

if TYPE_CHECKING:
    from ._config import KoalaConfig

__all__ = ["init_app", "koala_script"]

logger = logging.getLogger("flask_koala")

#: Session key of the "reset the browser's identity on the next page" flag.
RESET_KEY = "_koala_reset"

_MARKER_BYTES = MARKER.encode("ascii")
_UTF8 = ("utf-8", "utf8")
# Apps already told, at DEBUG, that they have no public key to load the pixel with.
_told_no_key: weakref.WeakSet[Flask] = weakref.WeakSet()


def init_app(app: Flask, config: KoalaConfig) -> None:
    """Register ``koala_script``, the logout receiver and, if asked, the insertion hook."""
    app.add_template_global(koala_script, "koala_script")
    # A module-level receiver with sender=app: blinker holds receivers weakly.
    user_logged_out.connect(_on_user_logged_out, sender=app)
    if config.inject_script:
        app.after_request(_insert_snippet)


def koala_script(
    nonce: Optional[str] = None,
    *,
    email: Optional[str] = None,
    traits: Optional[Mapping[str, Any]] = None,
    get_user: Optional[Callable[[], Any]] = None,
) -> Markup:
    """Koala's pixel for this page, and ``ko.identify`` for the visitor.

    Put ``{{ koala_script() }}`` in the base template, in ``<head>`` or before ``</body>``.
    Renders nothing when flask-koala is disabled (``KOALA_ENABLED = False``) or has no
    public key and no ``KOALA_SDK_URL`` to load the SDK from.

    Who is identified: the explicit ``email`` (and ``traits``) when given; otherwise what
    ``get_user()`` returns, read as ``@koala.identify_login(get_user=...)`` reads it (a user
    object through the identity loader, an email, a mapping of traits holding ``"email"``,
    or ``None``); otherwise Flask-Login's ``current_user`` when authenticated. Every value is
    checked as a server-side identify checks it, and escaped for the ``<script>`` element.

    Args:
        nonce: the CSP nonce for the script tags; defaults to ``KOALA_CSP_NONCE()``. An
            empty string means "no nonce".
        email: the visitor's email, for users Flask-Login does not know.
        traits: traits to send with ``email`` (or holding ``"email"`` themselves).
        get_user: a callable saying who the visitor is, such as the one given to
            ``@koala.identify_login``.
    """
    try:
        return _render(nonce, _Visitor(email, traits, get_user))
    except Exception as exc:
        log_unexpected(exc, "rendering the browser snippet", "the page is served without")
        return Markup("")


class _Visitor(NamedTuple):
    """Who ``koala_script()`` was told the visitor is, if anyone."""

    email: Optional[str]
    traits: Optional[Mapping[str, Any]]
    get_user: Optional[Callable[[], Any]]


def _render(nonce: Optional[str], visitor: _Visitor) -> Markup:
    if not has_app_context():
        return Markup("")
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    state = state_of(app)
    if state is None:
        return Markup("")
    config = state.config
    if not config.enabled:
        return Markup("")
    if config.sdk_url is not None:
        sdk_url = config.sdk_url
    elif config.public_key is not None:
        sdk_url = default_sdk_url(config.public_key)
    else:
        if app not in _told_no_key:
            _told_no_key.add(app)
            logger.debug(
                "flask-koala: koala_script() renders nothing: no KOALA_PUBLIC_KEY or "
                "KOALA_SDK_URL to load Koala's pixel from"
            )
        return Markup("")
    email, traits = (
        _identity(state.pipeline.resolver, visitor) if config.snippet_identify else (None, None)
    )
    return render_snippet(
        sdk_url,
        settings=config.sdk_settings,
        email=email,
        traits=traits,
        reset=_take_reset(),
        nonce=_nonce(config, nonce),
    )


def _identity(
    resolver: Resolver, visitor: _Visitor
) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    """The visitor's email and traits: as told, or through the same resolver as logins."""
    found: Union[Identity, str, None]
    if visitor.email is not None or visitor.traits is not None:
        if visitor.traits is not None and not isinstance(visitor.traits, Mapping):
            logger.debug("flask-koala: koala_script(traits=...) is not a mapping; no ko.identify")
            return None, None
        told = visitor.traits or {}
        found = Identity(visitor.email if visitor.email is not None else told.get("email"), told)
    elif visitor.get_user is not None:
        try:
            found = resolver.result(visitor.get_user())
        except Exception as exc:  # its message may hold the email: type and place only
            logger.error("flask-koala: get_user raised %s; no ko.identify", describe_error(exc))
            return None, None
    else:
        user = current_user()
        found = None if user is None else resolver.user(user)
    if not isinstance(found, Identity):
        return None, None
    email = clean_email(found.email)
    if email is None:
        logger.debug("flask-koala: no usable email for the visitor; no ko.identify")
        return None, None
    traits, _ = clean_traits(found.traits)
    if traits is None:
        return None, None
    # The email is identify's first argument; repeating it in the traits adds nothing.
    traits.pop("email", None)
    return email, traits


def _take_reset() -> bool:
    """Whether a logout happened since the last page; clears the flag when it did."""
    if not has_request_context() or not session.get(RESET_KEY):
        return False
    session.pop(RESET_KEY, None)
    return True


def _nonce(config: KoalaConfig, explicit: Optional[str]) -> Optional[str]:
    if explicit is not None:
        return str(explicit) or None
    if config.csp_nonce is None:
        return None
    try:
        value = config.csp_nonce()
    except Exception as exc:
        log_unexpected(exc, "calling KOALA_CSP_NONCE", "the snippet is rendered without a nonce")
        return None
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        logger.warning(
            "flask-koala: KOALA_CSP_NONCE returned a %s, not a str; snippet rendered without "
            "a nonce",
            type(value).__name__,
        )
        return None
    return value


def _on_user_logged_out(sender: Any, user: Any = None, **extra: Any) -> None:
    """Flask-Login's ``user_logged_out``: the next page tells the pixel to forget the user."""
    try:
        if not getattr(user, "is_authenticated", False):
            return
        state = state_of(sender)
        if state is None or not state.config.enabled:
            return
        session[RESET_KEY] = True
    except Exception as exc:
        log_unexpected(exc, "noting the logout for the browser", "logout goes on")


def _insert_snippet(response: Response) -> Response:
    """``KOALA_INJECT_SCRIPT``: put the snippet before ``</body>`` of HTML pages without it."""
    try:
        _insert(response)
    except Exception as exc:
        log_unexpected(exc, "inserting the browser snippet", "the page is served as is")
    return response


def _insert(response: Response) -> None:
    if response.mimetype != "text/html" or response.direct_passthrough or response.is_streamed:
        return
    if response.status_code in (204, 304) or "Content-Encoding" in response.headers:
        return
    if response.mimetype_params.get("charset", "utf-8").lower() not in _UTF8:
        return
    body = response.get_data()
    if _MARKER_BYTES in body:
        return
    at = body.lower().rfind(b"</body")
    if at < 0:
        return
    snippet = koala_script()
    if not snippet:
        return
    response.set_data(body[:at] + str(snippet).encode("utf-8") + b"\n" + body[at:])
