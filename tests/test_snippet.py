"""The snippet's markup and escaping, without Flask."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from markupsafe import Markup

from flask_koala._snippet import (
    DEFAULT_SDK_URL,
    STUB_METHODS,
    default_sdk_url,
    render_snippet,
    script_json,
)

SDK = "https://cdn.getkoala.com/v1/pk_test/sdk.js"

HOSTILE = [
    "</script><script>alert(1)</script>",
    "</SCRIPT ><script>alert(1)</script>",
    "<!--<script>",
    "-->",
    "\"'); alert(1); ('\"",
    "line\u2028separator\u2029paragraph",
    "&lt;&amp;",
    "back\\slash",
    "\u00e9\U0001f600",
]


def call_args(markup: str, method: str) -> list[Any]:
    """The decoded arguments of the one ``ko.<method>(...)`` call in the markup."""
    (args,) = re.findall(rf"ko\.{method}\((.*?)\);(?:\}}\);)?$", markup, re.MULTILINE)
    return json.loads(f"[{args}]")  # type: ignore[no-any-return]


def script_tags(markup: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>", markup)


# -- script_json ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE)
def test_script_json_round_trips(value: str) -> None:
    assert json.loads(script_json(value)) == value


@pytest.mark.parametrize("value", HOSTILE)
def test_script_json_leaves_nothing_html_can_read(value: str) -> None:
    text = script_json({"k": value, value: [value]})
    for forbidden in ("<", ">", "&", "'", "\u2028", "\u2029"):
        assert forbidden not in text
    assert text.isascii()


def test_script_json_rejects_what_json_cannot_carry() -> None:
    with pytest.raises(ValueError, match="Out of range"):
        script_json(float("nan"))
    with pytest.raises(TypeError):
        script_json({1, 2})


# -- the loader ----------------------------------------------------------------------------


def test_returns_markup() -> None:
    assert isinstance(render_snippet(SDK), Markup)


def test_anonymous_page_has_only_the_loader() -> None:
    html = str(render_snippet(SDK))
    assert "ko.identify(" not in html
    assert "ko.reset(" not in html
    assert "koalaSettings" not in html
    assert len(script_tags(html)) == 1


def test_loader_is_a_no_op_when_ko_exists() -> None:
    assert "if(window.ko)return;" in render_snippet(SDK)


def test_loader_queues_every_stub_method() -> None:
    html = str(render_snippet(SDK))
    assert json.dumps(list(STUB_METHODS), separators=(",", ":")) in html
    assert STUB_METHODS == (
        "identify",
        "track",
        "removeListeners",
        "on",
        "off",
        "qualify",
        "ready",
        "open",
    )


def test_loader_appends_the_sdk_async() -> None:
    html = str(render_snippet(SDK))
    assert "s.async=!0;" in html
    assert f's.setAttribute("src","{SDK}");' in html


def test_sdk_url_is_escaped_like_any_value() -> None:
    html = str(render_snippet("https://proxy.example.com/sdk.js?a=1&b=</script>"))
    assert html.count("</script") == 1
    assert "\\u0026b=\\u003c/script\\u003e" in html


def test_default_sdk_url() -> None:
    assert default_sdk_url("pk_live") == "https://cdn.getkoala.com/v1/pk_live/sdk.js"
    assert DEFAULT_SDK_URL.format(public_key="pk") == default_sdk_url("pk")


def test_marker_is_on_the_tag() -> None:
    assert str(render_snippet(SDK)).startswith("<script data-flask-koala>")


# -- settings ------------------------------------------------------------------------------


def test_settings_come_first() -> None:
    settings = {"host": "https://koala.example.com", "sdk_settings": {"autocapture": False}}
    html = str(render_snippet(SDK, settings=settings))
    (encoded,) = re.findall(r"window\.koalaSettings = (.*?);\n", html)
    assert json.loads(encoded) == settings
    assert html.index("window.koalaSettings") < html.index("if(window.ko)")


def test_hostile_settings_stay_inside() -> None:
    html = str(render_snippet(SDK, settings={"host": HOSTILE[0]}))
    assert html.count("</script") == 1


# -- identify and reset --------------------------------------------------------------------


def test_identify_after_the_loader() -> None:
    html = str(render_snippet(SDK, email="jane@example.com", traits={"name": "Jane"}))
    assert call_args(html, "identify") == ["jane@example.com", {"name": "Jane"}]
    assert html.index("if(window.ko)") < html.index("ko.identify(")


def test_identify_without_traits_sends_an_empty_object() -> None:
    html = str(render_snippet(SDK, email="jane@example.com"))
    assert call_args(html, "identify") == ["jane@example.com", {}]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_email_and_traits_cannot_escape(value: str) -> None:
    email = f"{value}@example.com"
    traits = {"name": value, value: {"nested": [value]}}
    html = str(render_snippet(SDK, email=email, traits=traits, reset=True, nonce="n"))
    # The only "</script" is the real end tag, and no comment can open.
    assert html.count("</script") == 1
    assert html.lower().count("</script") == 1
    assert html.endswith("</script>")
    assert "<!--" not in html
    assert "\u2028" not in html
    assert "\u2029" not in html
    assert call_args(html, "identify") == [email, traits]


def test_reset_runs_once_the_sdk_is_ready() -> None:
    # The stub has no reset method: calling it before the SDK arrived would throw.
    html = str(render_snippet(SDK, reset=True))
    assert "ko.ready(function(){ko.reset();});" in html


def test_reset_comes_before_identify_of_the_next_user() -> None:
    html = str(render_snippet(SDK, email="new@example.com", reset=True))
    assert 'ko.ready(function(){ko.reset();ko.identify("new@example.com",{});});' in html


# -- nonce ---------------------------------------------------------------------------------


def test_no_nonce_no_attribute() -> None:
    html = str(render_snippet(SDK))
    assert "nonce" not in html


def test_nonce_on_inline_tag_and_sdk_tag() -> None:
    html = str(render_snippet(SDK, email="jane@example.com", settings={"a": 1}, nonce="r4nd0m"))
    assert all('nonce="r4nd0m"' in tag for tag in script_tags(html))
    assert 's.setAttribute("nonce","r4nd0m");' in html


def test_nonce_is_escaped_as_an_attribute() -> None:
    html = str(render_snippet(SDK, nonce='x"><script>alert(1)</script>'))
    (tag,) = script_tags(html)
    assert (
        tag == '<script data-flask-koala nonce="x&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;">'
    )
    assert html.count("</script") == 1
