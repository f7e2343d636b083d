"""Koala's browser pixel as HTML: the loader, its settings and the calls queued for it.

Plain Python, no Flask: everything that decides what reaches the page, and how it is escaped,
is here and can be tested on its own. :mod:`flask_koala._templating` only gathers the values
(settings, the logged-in user, the pending reset, the nonce) and calls :func:`render_snippet`.

Every value spliced into the script is untrusted (an email, a profile trait, a setting), so
each goes through :func:`script_json` and nothing else: no string formatting of raw values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Optional

from markupsafe import Markup

__all__ = [
    "DEFAULT_SDK_URL",
    "MARKER",
    "STUB_METHODS",
    "default_sdk_url",
    "render_snippet",
    "script_json",
]

#: Where Koala serves its SDK; ``{public_key}`` is the workspace's public key.
DEFAULT_SDK_URL = "https://cdn.getkoala.com/v1/{public_key}/sdk.js"

#: The attribute on the snippet's ``<script>`` tag; its presence means "already on the page".
MARKER = "data-flask-koala"

#: The methods Koala's loader stub queues until the SDK arrives, as Koala's snippet has them.
STUB_METHODS = ("identify", "track", "removeListeners", "on", "off", "qualify", "ready", "open")

# json.dumps(ensure_ascii=True) already writes U+2028, U+2029 and all non-ASCII as \uXXXX;
# these are the ASCII characters that matter to the HTML parser inside <script>: "<" starts
# "</script" and "<!--", ">" ends "-->", "&" and "'" for the odd consumer that decodes the
# text as HTML or puts it in an attribute.
_HTML_UNSAFE = re.compile(r"[<>&']")


def script_json(value: Any) -> str:
    """``value`` as a JavaScript literal that is safe inside an HTML ``<script>`` element.

    JSON, ASCII only, with ``<``, ``>``, ``&`` and ``'`` written as ``\\u003c``-style
    escapes, so neither ``</script>`` nor ``<!--`` can appear, and U+2028 / U+2029 cannot
    end a line in older JavaScript engines. A JavaScript engine reads back exactly
    ``value``.

    Raises:
        TypeError, ValueError: ``value`` is not plain JSON data (or holds NaN/infinity).
    """
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return _HTML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def default_sdk_url(public_key: str) -> str:
    """Koala's CDN address of the SDK for a workspace."""
    return DEFAULT_SDK_URL.format(public_key=public_key)


def render_snippet(
    sdk_url: str,
    *,
    settings: Optional[Mapping[str, Any]] = None,
    email: Optional[str] = None,
    traits: Optional[Mapping[str, Any]] = None,
    reset: bool = False,
    nonce: Optional[str] = None,
) -> Markup:
    """One ``<script>`` element that installs Koala's pixel and queues the page's calls.

    In order: ``window.koalaSettings`` (when ``settings`` is given); Koala's loader stub,
    which does nothing when ``window.ko`` exists already and otherwise makes ``window.ko`` a
    queue and appends the async SDK script; then the calls.

    The stub has no ``reset`` method, so ``ko.reset()`` is only safe once the SDK is there:
    it runs from ``ko.ready(...)``. When the same page also identifies someone (a logout then
    a login before any page was shown), the identify runs in that callback too, after the
    reset, so the reset cannot wipe out the new identity.

    Args:
        sdk_url: where the browser loads the SDK from.
        settings: becomes ``window.koalaSettings``.
        email: when given, ``ko.identify(email, traits)`` is queued.
        traits: sent with the identify; ``{}`` when ``None``.
        reset: queue ``ko.reset()``, as after a logout.
        nonce: the request's CSP nonce, put on the inline script and on the SDK's script.

    Raises:
        TypeError, ValueError: ``settings`` or ``traits`` is not plain JSON data.
    """
    lines: list[str] = []
    if settings is not None:
        lines.append(f"window.koalaSettings = {script_json(settings)};")
    lines.append(_loader(sdk_url, nonce))
    calls: list[str] = []
    if reset:
        calls.append("ko.reset();")
    if email is not None:
        calls.append(f"ko.identify({script_json(email)},{script_json(dict(traits or {}))});")
    if reset:
        lines.append("ko.ready(function(){" + "".join(calls) + "});")
    else:
        lines.extend(calls)
    nonce_attr = Markup(' nonce="{}"').format(nonce) if nonce else Markup("")
    # Every line above is built from script_json output and fixed text only, which is what
    # makes marking it safe correct.
    body = Markup("\n".join(lines))
    return Markup("<script {}{}>\n{}\n</script>").format(Markup(MARKER), nonce_attr, body)


def _loader(sdk_url: str, nonce: Optional[str]) -> str:
    """Koala's loader stub, with the SDK's URL (and nonce) spliced in as JSON."""
    methods = script_json(list(STUB_METHODS))
    set_nonce = f's.setAttribute("nonce",{script_json(nonce)});' if nonce else ""
    return (
        "!function(){if(window.ko)return;var ko=window.ko=[];"
        f"{methods}.forEach(function(m){{ko[m]=function(){{"
        "var a=[].slice.call(arguments);a.unshift(m);ko.push(a);return ko}});"
        'var s=document.createElement("script");s.async=!0;'
        f's.setAttribute("src",{script_json(sdk_url)});{set_nonce}'
        "(document.body||document.head).appendChild(s)}();"
    )
