"""Figure 3: how fast a backlog drains when every round trip takes 50 ms.

Runs in a fresh process (``python -m benchmarks.drain URL CALLS``) against a receiver that
holds each answer 50 ms, and prints one JSON line. First the round trip itself is timed
with a raw keep-alive ``http.client`` POST (median of a few); then ``CALLS`` identifies,
each about a different person so that none can share a request, are handed to flask-koala
at once and timed until ``flush()`` returns. Worker start-up and connection set-up count.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from .apps import PUBLIC_KEY, USER, build, koala_body, traits
from .stats import median


def _round_trip(url: str, samples: int = 5) -> float:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port)
    body = json.dumps(koala_body(str(uuid.uuid4()), USER), separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "bench"}
    times = []
    for _ in range(samples + 1):
        start = time.perf_counter()
        connection.request("POST", f"/web/projects/{PUBLIC_KEY}/batch", body=body, headers=headers)
        connection.getresponse().read()
        times.append(time.perf_counter() - start)
    connection.close()
    return median(times[1:])  # the first one also connects


def main(argv: list[str]) -> dict[str, Any]:
    url, calls = argv[0], int(argv[1])
    round_trip = _round_trip(url)
    app = build("koala", url)
    with app.app_context():
        koala = app.extensions["bench_koala"]
        workers = koala.config.max_workers
        people = [str(uuid.uuid4()) for _ in range(calls)]
        start = time.perf_counter()
        for profile_id in people:
            koala.identify(USER.email, traits(USER), profile_id=profile_id)
        delivered = koala.flush(timeout=120)
        elapsed = time.perf_counter() - start
        koala.shutdown(timeout=5)
    return {
        "rate": calls / elapsed,
        "ideal": workers / round_trip,
        "round_trip": round_trip,
        "workers": workers,
        "calls": calls,
        "delivered": delivered,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
