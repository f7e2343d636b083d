"""In a real browser: headless Chromium runs the snippet against a local stand-in SDK.

The app is served on 127.0.0.1 by a real WSGI server in a thread, under a strict Content
Security Policy (nonces only), with ``KOALA_SDK_URL`` aimed at ``/sdk.js`` on the same
server. That stand-in SDK records the queue the loader stub built, then replays it, as the
real SDK does, into an object that only records calls, and writes both into the page for
``--dump-dom`` to show. Nothing leaves the machine: Chromium may resolve no other host.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import pytest
from flask import Flask, Response, g, redirect, render_template_string, request
from flask_login import LoginManager, UserMixin, login_user, logout_user
from werkzeug.serving import make_server

from flask_koala import Koala

pytestmark = pytest.mark.slow

CHROMIUM_TIMEOUT = 60.0
HOSTILE = "</script><script>document.title='pwned'</script>"

PAGE = """<!doctype html>
<html><head><title>koala test</title>{{ koala_script() }}</head>
<body>
<pre id="ko-queue">no sdk</pre>
<pre id="ko-calls">no sdk</pre>
</body></html>"""

# A stand-in for Koala's SDK. Like the real one it replaces window.ko and replays the queued
# calls; unlike it, it only records them, then shows what it found and what it ran.
FAKE_SDK = """(function () {
  var queue = window.ko || [];
  var found = JSON.stringify(queue, function (key, value) {
    return typeof value === "function" ? "<function>" : value;
  });
  var calls = [], waiting = [], sdk = {};
  ["identify", "track", "removeListeners", "on", "off", "qualify", "open", "reset"]
    .forEach(function (name) {
      sdk[name] = function () {
        calls.push([name].concat([].slice.call(arguments)));
        return sdk;
      };
    });
  sdk.ready = function (callback) { waiting.push(callback); return sdk; };
  window.ko = sdk;
  queue.forEach(function (entry) { sdk[entry[0]].apply(sdk, entry.slice(1)); });
  waiting.forEach(function (callback) { callback(); });
  function show() {
    document.getElementById("ko-queue").textContent = found;
    document.getElementById("ko-calls").textContent = JSON.stringify(calls);
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", show);
  } else {
    show();
  }
})();
"""


class User(UserMixin):
    def __init__(self, user_id: str, email: str, **traits: Any) -> None:
        self.id = user_id
        self.email = email
        self.traits = traits


USERS = {
    "jane": User("jane", "jane@example.com", name="Jane Doe", plan="pro"),
    "mallory": User(
        "mallory",
        f'"{HOSTILE}\'<!--"@example.com',
        name=HOSTILE,
        bio="quote\" apostrophe' line\u2028sep\u2029para -->",
    ),
}


def build_app(base_url: str) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="browser-test",
        KOALA_PUBLIC_KEY="pk_test",
        KOALA_SUPPRESS_SEND=True,
        KOALA_SDK_URL=f"{base_url}/sdk.js",
        KOALA_CSP_NONCE=lambda: g.nonce,
    )
    login_manager = LoginManager(app)
    login_manager.user_loader(USERS.get)
    koala = Koala(app)

    @koala.identity_loader
    def identity(user: User) -> dict[str, Any]:
        return {"email": user.email, **user.traits}

    @app.before_request
    def make_nonce() -> None:
        g.nonce = os.urandom(12).hex()

    @app.after_request
    def strict_csp(response: Response) -> Response:
        nonce = g.get("nonce", "none")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; connect-src 'self'"
        )
        return response

    @app.get("/page")
    def page() -> str:
        return render_template_string(PAGE)

    @app.get("/sdk.js")
    def sdk() -> Response:
        return Response(FAKE_SDK, mimetype="text/javascript")

    # Test-only shortcuts: Chromium follows the redirect and keeps the session cookie.
    @app.get("/auto-login/<user_id>")
    def auto_login(user_id: str) -> Any:
        login_user(USERS[user_id])
        return redirect(request.args.get("next", "/page"))

    @app.get("/auto-logout")
    def auto_logout() -> Any:
        logout_user()
        return redirect(request.args.get("next", "/page"))

    return app


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but Chromium is missing: .ci/run must install `chromium`")
        pytest.skip("no `chromium` on PATH (Debian: apt-get install chromium); CI always runs this")
    return path


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The test app on 127.0.0.1, served by werkzeug's threaded server."""
    holder: dict[str, Flask] = {}

    def wsgi(environ: Any, start_response: Any) -> Any:
        return holder["app"](environ, start_response)

    httpd = make_server("127.0.0.1", 0, wsgi, threaded=True)
    base_url = f"http://127.0.0.1:{httpd.server_port}"
    holder["app"] = build_app(base_url)
    thread = threading.Thread(target=httpd.serve_forever, name="browser-test-server")
    thread.start()
    try:
        yield base_url
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
def browse(chromium: str, server: str, tmp_path: Path) -> Callable[[str], str]:
    """Load a path in a fresh headless Chromium profile and return the DOM it ends with."""

    def run(path: str) -> str:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-proxy-server",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            server + path,
        ]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=CHROMIUM_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"Chromium did not finish loading {path} in {CHROMIUM_TIMEOUT}s")
        assert process.returncode == 0, err[-3000:]
        return out

    return run


def shown(dom: str, element_id: str) -> Any:
    """The JSON the stand-in SDK wrote into ``<pre id=element_id>``."""
    match = re.search(rf'<pre id="{element_id}">(.*?)</pre>', dom, re.DOTALL)
    assert match is not None, dom
    text = html.unescape(match.group(1))
    assert text != "no sdk", f"the SDK never ran:\n{dom}"
    return json.loads(text)


def test_anonymous_visitor_queues_nothing(browse: Callable[[str], str]) -> None:
    dom = browse("/page")
    assert shown(dom, "ko-queue") == []
    assert shown(dom, "ko-calls") == []


def test_logged_in_user_is_identified(browse: Callable[[str], str]) -> None:
    dom = browse("/auto-login/jane?next=/page")
    identify = ["identify", "jane@example.com", {"name": "Jane Doe", "plan": "pro"}]
    assert shown(dom, "ko-queue") == [identify]
    assert shown(dom, "ko-calls") == [identify]


def test_logout_resets_the_pixel(browse: Callable[[str], str]) -> None:
    dom = browse("/auto-login/jane?next=" + quote("/auto-logout?next=/page"))
    assert shown(dom, "ko-queue") == [["ready", "<function>"]]
    assert shown(dom, "ko-calls") == [["reset"]]


def test_hostile_identity_arrives_intact(browse: Callable[[str], str]) -> None:
    dom = browse("/auto-login/mallory?next=/page")
    mallory = USERS["mallory"]
    identify = ["identify", mallory.email, mallory.traits]
    assert shown(dom, "ko-calls") == [identify]
    assert "<title>koala test</title>" in dom
