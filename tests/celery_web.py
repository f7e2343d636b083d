"""A web process for the exit and kill tests.

``python -m tests.celery_web <api_url> <queue> <logins> [<mode>]`` sets up an app with
``KOALA_DISPATCHER = "celery"`` and logs in through the real view ``<logins>`` times, each
with a visitor of its own, as soon as the app is set up. It prints each ``message_id``,
then:

- ``flush`` (the default): calls ``koala.flush()``, so every call has been published,
  prints ``done`` and waits to be killed;
- ``wait``: prints ``returned`` at once, without flushing, and waits to be killed (the
  test kills it shortly after: the window the docs promise);
- ``serve``: logs nobody in itself; serves the app over HTTP on a loopback port (printed
  as ``port <n>``), printing each ``message_id`` as its call is accepted, until killed:
  the test logs in over HTTP, as a browser would, and kills it once the last login's
  response is in.
- ``exit``: prints ``returned`` and lets the interpreter exit, without flushing, as a
  script or a CLI command does.

With ``KOALA_TEST_SLOW_IMPORT=<module>`` in its environment, importing that module takes a
second more, as it may on a cold start (the broker client took 0.3 to 1.3 s to import and
connect in the field).
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any, Optional

from celery import Celery
from werkzeug.serving import make_server

from flask_koala import Koala, signals

from .support import build_app


class _SlowImport(importlib.abc.MetaPathFinder):
    """Holds the first import of one module for a second, then lets the others find it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> None:
        if fullname == self.name:
            time.sleep(1.0)


def main(api_url: str, queue: str, logins: int, mode: str) -> None:
    celery_app = Celery("flask_koala_web", broker=os.environ["KOALA_TEST_BROKER_URL"])
    koala = Koala(celery=celery_app)
    app = build_app(
        {"KOALA_API_URL": api_url, "KOALA_DISPATCHER": "celery", "KOALA_CELERY_QUEUE": queue},
        koala,
    )
    client = app.test_client()
    ids: list[str] = []

    def record(sender: object, **extra: Any) -> None:
        ids.append(extra["message_id"])

    if mode == "serve":
        _serve(app)
        return
    with signals.call_accepted.connected_to(record, sender=app):
        for _ in range(logins):
            client.set_cookie("ko_id", str(uuid.uuid4()))
            # Closed as a WSGI server closes every response: that is what wakes delivery.
            with client.post("/login/jane") as response:
                assert response.status_code == 200
    for message_id in ids:
        print("message_id", message_id, flush=True)
    if mode == "flush":
        with app.app_context():
            assert koala.flush(30), "the calls were not published"
            assert koala.stats["published"] == logins, dict(koala.stats)
        print("done", flush=True)
    else:
        print("returned", flush=True)
    if mode != "exit":
        time.sleep(3600)  # the test kills us with SIGKILL


def _serve(app: Any) -> None:
    def announce(sender: object, **extra: Any) -> None:
        print("message_id", extra["message_id"], flush=True)  # before the response goes out

    signals.call_accepted.connect(announce, sender=app, weak=False)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print("port", server.port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if os.environ.get("KOALA_TEST_SLOW_IMPORT"):
        sys.meta_path.insert(0, _SlowImport(os.environ["KOALA_TEST_SLOW_IMPORT"]))
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "flush")
