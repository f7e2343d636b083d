"""``make demo``: the password-login example wired to a loopback Koala, no account needed.

Starts the receiver on 127.0.0.1:8787 (printing each call as it arrives) and the example
app on http://127.0.0.1:5000, and prints every login that was not sent, with the reason.
Ctrl-C stops both. Ports: ``DEMO_PORT``, ``DEMO_RECEIVER_PORT``.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from typing import Any, Callable, TypeVar

from werkzeug.serving import make_server

from flask_koala import signals
from flask_koala._cli_receiver import format_call
from flask_koala._receiver import KoalaReceiver, ReceivedCall

from .password_login import DEMO_EMAIL, DEMO_PASSWORD, create_app, koala

CURL_PROFILE_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
T = TypeVar("T")

#: Why a login was not sent, in a newcomer's words; the reason itself is printed too.
WHY = {
    "no_cookie": "the request had no ko_id cookie (Koala's pixel has not run in this browser "
    "yet: load the page first, or send the cookie as the curl line does)",
    "bad_cookie": "the ko_id cookie is not a UUID",
    "no_email": "the user has no email",
    "bad_email": "the user's email is not plausible",
    "duplicate": "this visitor and email were already identified in this request",
    "excluded": "the identity loader returned None",
}


def banner(app_url: str, receiver_url: str) -> str:
    return f"""
flask-koala demo
  app       {app_url}    (log in as {DEMO_EMAIL} / {DEMO_PASSWORD})
  receiver  {receiver_url}   (a loopback Koala: every identify call is printed below,
                                    and so is every login that was not sent, with why)

Open the app in a browser and sign in, or from another terminal:

  curl -s -o /dev/null -w '%{{http_code}}\\n' -b 'ko_id={CURL_PROFILE_ID}' \\
       -d 'email={DEMO_EMAIL}&password={DEMO_PASSWORD}' {app_url}/login

To send to a real Koala workspace instead, run the example app alone with your key and
KOALA_API_URL set: Koala's own API (flask-koala's default, which currently answers every
call 400 "Koala ingest suspended") or your Koala-compatible collector. Left unset, the
example app sends to the loopback receiver at http://127.0.0.1:8787.

  KOALA_PUBLIC_KEY=pk_your_key KOALA_API_URL=https://your-collector.example \\
      .venv/bin/flask --app examples.password_login run

Ctrl-C stops everything.
"""


def main() -> None:
    app_port = int(os.environ.get("DEMO_PORT", "5000"))
    receiver_port = int(os.environ.get("DEMO_RECEIVER_PORT", "8787"))
    print_lock = threading.Lock()

    def show(call: ReceivedCall) -> None:
        with print_lock:
            print(format_call(call), flush=True)

    receiver = _bind(
        "DEMO_RECEIVER_PORT", receiver_port, KoalaReceiver(port=receiver_port, on_call=show).start
    )
    app_url = f"http://127.0.0.1:{app_port}"
    app = create_app(
        {
            "KOALA_API_URL": receiver.url,
            # The real SDK lives on Koala's CDN; the stand-in sets the ko_id cookie offline.
            "KOALA_SDK_URL": f"{app_url}/static/koala-stand-in-sdk.js",
        }
    )
    _print_unsent_logins(app, print_lock)
    try:
        server = _bind(
            "DEMO_PORT", app_port, lambda: make_server("127.0.0.1", app_port, app, threaded=True)
        )
    except SystemExit:
        receiver.stop()
        raise
    signal.signal(signal.SIGTERM, _interrupt)
    print(banner(app_url, receiver.url), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C while stopping would interrupt the flush with a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        server.server_close()
        with app.app_context():
            koala.shutdown(timeout=2)
        receiver.stop()
        print("\nflask-koala demo stopped.", flush=True)


def _bind(variable: str, port: int, start: Callable[[], T]) -> T:
    """Start a server on ``port``; a port in use ends the demo naming the variable to set."""
    try:
        return start()
    except (OSError, SystemExit) as exc:
        # Werkzeug's make_server reports a port in use itself, then exits.
        if isinstance(exc, OSError) and exc.errno != errno.EADDRINUSE:
            raise
        print(
            f"flask-koala demo: port {port} on 127.0.0.1 is already in use. Pick another one "
            f"with {variable}, e.g. {variable}={port + 1} make demo",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1) from None


def _print_unsent_logins(app: Any, print_lock: threading.Lock) -> None:
    """Say, on the demo's console, each login that was skipped or failed, and why."""

    def skipped(sender: Any, reason: str = "", **extra: Any) -> None:
        with print_lock:
            why = WHY.get(reason, "see the troubleshooting page of the docs")
            print(f"login NOT sent to Koala: skipped ({reason}): {why}", flush=True)

    def failed(sender: Any, reason: str = "", status: Any = None, **extra: Any) -> None:
        with print_lock:
            print(f"login NOT delivered: failed ({reason}, HTTP {status})", flush=True)

    # Held by the app for as long as it runs: blinker keeps receivers weakly.
    app.extensions["koala_demo_receivers"] = (skipped, failed)
    signals.call_skipped.connect(skipped, sender=app)
    signals.call_failed.connect(failed, sender=app)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
