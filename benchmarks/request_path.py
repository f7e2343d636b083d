"""How long ``koala.identify()`` holds the request: the request thread's whole share.

Usage: ``python -m benchmarks.request_path CALLS ROUNDS``; prints one JSON line.

Each round is one request with a ``ko_id`` cookie, through the app's WSGI stack as a server
sends it, whose view makes CALLS identifies with four traits (distinct emails, so none is a
duplicate) in thread mode, as a login does: the calls are queued and the workers are not
woken until the response is closed. The figure is CPU time per call
(``time.process_time``, so other processes on a shared machine do not count), timed inside
the view, median over rounds, with the fastest and slowest round as the spread. A sink
receiver takes the calls between rounds, so the queue never fills.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

from flask import Flask

from flask_koala import Koala
from flask_koala.testing import KoalaReceiver

PROFILE_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
TRAITS = {"name": "Jane Doe", "plan": "pro", "seats": 12, "is_trial": False}


def measure(calls: int, rounds: int) -> dict[str, Any]:
    with KoalaReceiver() as receiver:
        app = Flask(__name__)
        app.config.update(
            KOALA_PUBLIC_KEY="pk_bench",
            KOALA_API_URL=receiver.url,
            KOALA_MAX_QUEUE_SIZE=calls * 2,
        )
        koala = Koala(app)
        emails = [f"user{i}@example.com" for i in range(calls)]
        per_call: list[float] = []

        @app.post("/round")
        def timed_round() -> str:
            start = time.process_time()
            for email in emails:
                koala.identify(email, TRAITS)
            per_call.append((time.process_time() - start) / calls)
            return "ok"

        client = app.test_client()
        client.set_cookie("ko_id", PROFILE_ID)
        for _ in range(rounds + 1):  # the first round warms up
            client.post("/round").close()  # closed as a server closes it: the wake-up
            with app.app_context():
                koala.flush(60)
        with app.app_context():
            koala.shutdown(10)
            sent = koala.stats["sent"]
    timed = per_call[1:]
    return {
        "calls": calls,
        "rounds": rounds,
        "sent": sent,
        "median": statistics.median(timed),
        "min": min(timed),
        "max": max(timed),
    }


def main(argv: list[str]) -> dict[str, Any]:
    return measure(int(argv[0]), int(argv[1]))


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
