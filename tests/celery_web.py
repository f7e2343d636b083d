"""A web process for the kill test: ``python -m tests.celery_web <api_url> <queue> <logins>``.

It logs in through the real view ``<logins>`` times with ``KOALA_DISPATCHER = "celery"``,
calls ``koala.flush()`` so that every call has been published to the broker (the
background publisher's window is closed, on purpose: see the README's Celery section), prints
each ``message_id``, then ``done``, and waits to be killed.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from celery import Celery

from flask_koala import Koala, signals

from .support import PROFILE_ID, build_app


def main(api_url: str, queue: str, logins: int) -> None:
    celery_app = Celery("flask_koala_web", broker=os.environ["KOALA_TEST_BROKER_URL"])
    koala = Koala(celery=celery_app)
    app = build_app(
        {"KOALA_API_URL": api_url, "KOALA_DISPATCHER": "celery", "KOALA_CELERY_QUEUE": queue},
        koala,
    )
    client = app.test_client()
    client.set_cookie("ko_id", PROFILE_ID)
    ids: list[str] = []

    def record(sender: object, **extra: Any) -> None:
        ids.append(extra["message_id"])

    with signals.call_accepted.connected_to(record, sender=app):
        for _ in range(logins):
            assert client.post("/login/jane").status_code == 200
    with app.app_context():
        assert koala.flush(30), "the calls were not published"
        assert koala.stats["published"] == logins, dict(koala.stats)
    for message_id in ids:
        print("message_id", message_id, flush=True)
    print("done", flush=True)
    time.sleep(3600)  # the test kills us with SIGKILL


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
