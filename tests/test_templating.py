"""``koala_script()`` in a real app: who is identified, the reset after logout, CSP nonces,
and the optional insertion into HTML pages."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
from typing import Any, Callable

import pytest
from flask import Flask, Response, g, jsonify, render_template_string, request, send_file, session
from flask_login import login_required, logout_user

from flask_koala import Koala
from flask_koala._templating import RESET_KEY

PAGE = "<!doctype html><html><head>{{ koala_script() }}</head><body><p>hi</p></body></html>"
BARE = "<!doctype html><html><head></head><body><p>hi</p></body></html>"
SDK = "https://cdn.getkoala.com/v1/pk_test/sdk.js"
TALISMAN_PAGE = "<head>{{ koala_script(nonce=csp_nonce()) }}</head>"

MakePage = Callable[..., Flask]


@pytest.fixture
def make_page_app(make_app: Callable[..., Flask]) -> MakePage:
    """Apps with sending suppressed and pages that do and do not call ``koala_script()``."""

    def make(config: dict[str, Any] | None = None, koala: Koala | None = None) -> Flask:
        app = make_app({"KOALA_SUPPRESS_SEND": True, **(config or {})}, koala)
        app.add_url_rule("/page", "page", lambda: render_template_string(PAGE))
        app.add_url_rule("/bare", "bare", lambda: render_template_string(BARE))
        app.add_url_rule(
            "/nonce/<value>",
            "nonce",
            lambda value: render_template_string("{{ koala_script(nonce=value) }}", value=value),
        )
        return app

    return make


@pytest.fixture
def page_app(make_page_app: MakePage, koala: Koala) -> Flask:
    return make_page_app(koala=koala)


@pytest.fixture
def page_client(page_app: Flask) -> Any:
    return page_app.test_client()


def page(client: Any, path: str = "/page") -> str:
    response = client.get(path)
    assert response.status_code == 200
    return response.get_data(as_text=True)  # type: ignore[no-any-return]


def identify_args(html: str) -> list[Any]:
    (args,) = re.findall(r"ko\.identify\((.*?)\);(?:\}\);)?$", html, re.MULTILINE)
    return json.loads(f"[{args}]")  # type: ignore[no-any-return]


# -- the template global -------------------------------------------------------------------


def test_registered_as_template_global(page_app: Flask) -> None:
    assert "koala_script" in page_app.jinja_env.globals


def test_anonymous_page_loads_the_pixel(page_client: Any) -> None:
    html = page(page_client)
    assert f's.setAttribute("src","{SDK}");' in html
    assert "ko.identify(" not in html
    assert "ko.reset(" not in html


def test_logged_in_page_identifies_the_user(page_client: Any) -> None:
    page_client.post("/login/jane")
    assert identify_args(page(page_client)) == ["jane@example.com", {}]


def test_traits_come_from_the_identity_loader(make_page_app: MakePage, koala: Koala) -> None:
    @koala.identity_loader
    def traits(user: Any) -> dict[str, Any]:
        return {"email": user.email, "name": user.name, "since": dt.date(2024, 1, 2)}

    client = make_page_app(koala=koala).test_client()
    client.post("/login/jane")
    assert identify_args(page(client)) == [
        "jane@example.com",
        {"name": "Jane Doe", "since": "2024-01-02"},
    ]


def test_loader_returning_none_means_no_identify(make_page_app: MakePage, koala: Koala) -> None:
    koala.identity_loader(lambda user: None)
    client = make_page_app(koala=koala).test_client()
    client.post("/login/jane")
    assert "ko.identify(" not in page(client)


def test_user_without_email_is_not_identified(page_client: Any) -> None:
    page_client.post("/login/noemail")
    html = page(page_client)
    assert "ko.identify(" not in html
    assert "if(window.ko)" in html


@pytest.mark.allow_errors
def test_loader_that_raises_leaves_the_page_alone(
    make_page_app: MakePage, koala: Koala, caplog: pytest.LogCaptureFixture
) -> None:
    @koala.identity_loader
    def broken(user: Any) -> dict[str, Any]:
        raise LookupError("boom")

    client = make_page_app({"KOALA_IDENTIFY_ON_LOGIN": False}, koala).test_client()
    client.post("/login/jane")
    html = page(client)
    assert "if(window.ko)" in html
    assert "ko.identify(" not in html
    assert "identity loader raised" in caplog.text


def test_identify_can_be_turned_off(make_page_app: MakePage) -> None:
    client = make_page_app({"KOALA_SNIPPET_IDENTIFY": False}).test_client()
    client.post("/login/jane")
    html = page(client)
    assert "if(window.ko)" in html
    assert "ko.identify(" not in html


def test_hostile_identity_stays_inside_the_script(make_page_app: MakePage, koala: Koala) -> None:
    hostile = "</script><script>alert(1)</script>"
    email = f'"{hostile}\'<!--"@example.com'

    @koala.identity_loader
    def traits(user: Any) -> dict[str, Any]:
        return {"email": email, "name": hostile, "bio": "'\u2029-->"}

    client = make_page_app(koala=koala).test_client()
    client.post("/login/jane")
    html = page(client)
    assert html.count("</script") == 1
    assert "<!--" not in html
    assert identify_args(html) == [email, {"name": hostile, "bio": "'\u2029-->"}]


def test_rendered_outside_a_request(page_app: Flask) -> None:
    with page_app.app_context():
        html = render_template_string("{{ koala_script() }}")
    assert "if(window.ko)" in html
    assert "ko.identify(" not in html


# -- reset after logout --------------------------------------------------------------------


def test_first_page_after_logout_resets(page_client: Any) -> None:
    page_client.post("/login/jane")
    page_client.post("/logout")
    html = page(page_client)
    assert "ko.ready(function(){ko.reset();});" in html
    assert "ko.identify(" not in html


def test_reset_happens_once(page_client: Any) -> None:
    page_client.post("/login/jane")
    page_client.post("/logout")
    page(page_client)
    assert "ko.reset(" not in page(page_client)


def test_logout_then_login_resets_then_identifies(page_client: Any) -> None:
    page_client.post("/login/jane")
    page_client.post("/logout")
    page_client.post("/login/jane")
    html = page(page_client)
    assert 'ko.ready(function(){ko.reset();ko.identify("jane@example.com",{});});' in html


def test_logout_while_anonymous_needs_no_reset(page_client: Any) -> None:
    page_client.post("/logout")
    assert "ko.reset(" not in page(page_client)
    with page_client.session_transaction() as session:
        assert RESET_KEY not in session


def test_logout_view_that_empties_the_session_first(page_app: Flask) -> None:
    # The README's advice for views that clear the whole session: clear, then log out.
    @page_app.post("/logout-all")
    @login_required
    def logout_all() -> Any:
        session.clear()
        logout_user()
        return jsonify(ok=True)

    client = page_app.test_client()
    client.post("/login/jane")
    client.post("/logout-all")
    assert "ko.reset(" in page(client)


def test_pending_reset_survives_non_html_responses(page_client: Any) -> None:
    page_client.post("/login/jane")
    page_client.post("/logout")
    page_client.get("/whoami")
    assert "ko.reset(" in page(page_client)


def test_disabled_app_notes_no_reset(make_page_app: MakePage) -> None:
    client = make_page_app({"KOALA_ENABLED": False}).test_client()
    client.post("/login/jane")
    client.post("/logout")
    with client.session_transaction() as session:
        assert RESET_KEY not in session


# -- settings and SDK URL ------------------------------------------------------------------


def test_settings_rendered(make_page_app: MakePage) -> None:
    settings = {"host": "https://koala.example.com", "sdk_settings": {"autocapture": False}}
    html = page(make_page_app({"KOALA_SDK_SETTINGS": settings}).test_client())
    (encoded,) = re.findall(r"window\.koalaSettings = (.*?);\n", html)
    assert json.loads(encoded) == settings


def test_sdk_url_override(make_page_app: MakePage) -> None:
    url = "https://koala.example.com/v1/pk_test/sdk.js"
    html = page(make_page_app({"KOALA_SDK_URL": url}).test_client())
    assert f's.setAttribute("src","{url}");' in html
    assert "cdn.getkoala.com" not in html


def test_sdk_url_without_public_key(make_page_app: MakePage) -> None:
    url = "https://koala.example.com/sdk.js"
    html = page(make_page_app({"KOALA_PUBLIC_KEY": None, "KOALA_SDK_URL": url}).test_client())
    assert f's.setAttribute("src","{url}");' in html


def test_no_public_key_renders_nothing_and_says_so_once(
    make_page_app: MakePage, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_page_app({"KOALA_PUBLIC_KEY": None}).test_client()
    assert "<script" not in page(client)
    assert "<script" not in page(client)
    told = [r for r in caplog.records if "renders nothing" in r.getMessage()]
    assert len(told) == 1
    assert told[0].levelno == logging.DEBUG


def test_disabled_renders_nothing(make_page_app: MakePage) -> None:
    assert "<script" not in page(make_page_app({"KOALA_ENABLED": False}).test_client())


# -- nonce ---------------------------------------------------------------------------------


def test_nonce_argument(page_app: Flask) -> None:
    html = page(page_app.test_client(), "/nonce/abc123")
    assert html.startswith('<script data-flask-koala nonce="abc123">')
    assert 's.setAttribute("nonce","abc123");' in html


def test_nonce_from_config(make_page_app: MakePage) -> None:
    def nonce() -> str:
        return str(g.setdefault("nonce", "n0nce"))

    client = make_page_app({"KOALA_CSP_NONCE": nonce}).test_client()
    client.post("/login/jane")
    html = page(client)
    assert '<script data-flask-koala nonce="n0nce">' in html
    assert 's.setAttribute("nonce","n0nce");' in html


def test_nonce_argument_wins_over_config(make_page_app: MakePage) -> None:
    app = make_page_app({"KOALA_CSP_NONCE": lambda: "from-config"})
    html = page(app.test_client(), "/nonce/from-arg")
    assert 'nonce="from-arg"' in html
    assert "from-config" not in html


@pytest.mark.allow_errors
def test_nonce_callable_that_raises(
    make_page_app: MakePage, caplog: pytest.LogCaptureFixture
) -> None:
    def nonce() -> str:
        raise RuntimeError("no nonce")

    html = page(make_page_app({"KOALA_CSP_NONCE": nonce}).test_client())
    assert "if(window.ko)" in html
    assert "nonce" not in html
    assert "calling KOALA_CSP_NONCE failed unexpectedly (RuntimeError at" in caplog.text
    assert "no nonce" not in caplog.text  # the type and the place, never the message


def test_nonce_that_is_not_a_string(
    make_page_app: MakePage, caplog: pytest.LogCaptureFixture
) -> None:
    html = page(make_page_app({"KOALA_CSP_NONCE": lambda: b"bytes"}).test_client())
    assert "nonce" not in html
    assert "not a str" in caplog.text


def test_talisman_nonce_matches_the_policy(make_page_app: MakePage) -> None:
    # The README's flask-talisman recipe.
    from flask_talisman import Talisman

    app = make_page_app({"KOALA_CSP_NONCE": lambda: request.csp_nonce})  # type: ignore[attr-defined]
    Talisman(
        app,
        force_https=False,
        content_security_policy={
            "default-src": "'self'",
            "script-src": ["'self'", "https://*.getkoala.com"],
            "connect-src": ["'self'", "https://*.getkoala.com", "wss://*.getkoala.com"],
        },
        content_security_policy_nonce_in=["script-src"],
    )
    app.add_url_rule("/explicit", "explicit", lambda: render_template_string(TALISMAN_PAGE))
    client = app.test_client()
    for path in ("/page", "/explicit"):
        response = client.get(path)
        (nonce,) = re.findall(r"'nonce-([^']+)'", response.headers["Content-Security-Policy"])
        assert f'<script data-flask-koala nonce="{nonce}">' in response.get_data(as_text=True)


# -- insertion into pages ------------------------------------------------------------------


@pytest.fixture
def inject_app(make_page_app: MakePage) -> Flask:
    app = make_page_app({"KOALA_INJECT_SCRIPT": True})
    app.add_url_rule("/json", "json", lambda: jsonify(html="</body>"))
    app.add_url_rule("/text", "text", lambda: Response("<body></body>", mimetype="text/plain"))
    app.add_url_rule(
        "/stream",
        "stream",
        lambda: Response(iter(["<html><body>", "</body></html>"]), mimetype="text/html"),
    )
    app.add_url_rule(
        "/no-body", "no_body", lambda: Response("<p>fragment</p>", mimetype="text/html")
    )
    return app


def test_inject_puts_the_snippet_before_body_end(inject_app: Flask) -> None:
    html = page(inject_app.test_client(), "/bare")
    assert html.count("data-flask-koala") == 1
    assert html.index("data-flask-koala") < html.index("</body>")
    assert html.endswith("</script>\n</body></html>")


def test_inject_updates_content_length(inject_app: Flask) -> None:
    response = inject_app.test_client().get("/bare")
    assert response.content_length == len(response.get_data())


def test_inject_identifies_the_user(inject_app: Flask) -> None:
    client = inject_app.test_client()
    client.post("/login/jane")
    assert identify_args(page(client, "/bare")) == ["jane@example.com", {}]


def test_inject_leaves_pages_that_have_the_snippet(inject_app: Flask) -> None:
    assert page(inject_app.test_client(), "/page").count("data-flask-koala") == 1


def test_inject_consumes_the_reset_once(inject_app: Flask) -> None:
    client = inject_app.test_client()
    client.post("/login/jane")
    client.post("/logout")
    assert "ko.reset(" in page(client, "/bare")
    assert "ko.reset(" not in page(client, "/bare")


@pytest.mark.parametrize("path", ["/json", "/text", "/stream", "/no-body"])
def test_inject_leaves_other_responses_alone(inject_app: Flask, path: str) -> None:
    assert "data-flask-koala" not in inject_app.test_client().get(path).get_data(as_text=True)


def test_inject_leaves_files_alone(inject_app: Flask) -> None:
    inject_app.add_url_rule(
        "/file",
        "file",
        lambda: send_file(io.BytesIO(b"<body></body>"), mimetype="text/html"),
    )
    assert inject_app.test_client().get("/file").get_data() == b"<body></body>"


def test_inject_off_by_default(page_app: Flask) -> None:
    assert "data-flask-koala" not in page(page_app.test_client(), "/bare")


def test_inject_leaves_compressed_bodies_alone(inject_app: Flask) -> None:
    @inject_app.get("/gzip")
    def gzipped() -> Response:
        return Response(
            b"<body></body>", mimetype="text/html", headers={"Content-Encoding": "gzip"}
        )

    assert inject_app.test_client().get("/gzip").get_data() == b"<body></body>"


class UnreadableResponse(Response):
    """A body that cannot be read back, as some middleware-made responses behave."""

    def get_data(self, as_text: bool = False) -> Any:
        raise RuntimeError("unreadable body")


@pytest.mark.allow_errors
def test_inject_never_breaks_the_response(
    inject_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    inject_app.add_url_rule(
        "/odd", "odd", lambda: UnreadableResponse("<body></body>", mimetype="text/html")
    )
    response = inject_app.test_client().get("/odd")
    assert response.status_code == 200
    assert "inserting the browser snippet failed" in caplog.text
