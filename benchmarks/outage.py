"""Figure 5: delivery through a partial outage, half of Koala's answers 503.

Runs in a fresh process (``python -m benchmarks.outage URL CALLS WINDOW``) against a receiver
that holds each answer 20 ms and answers about half of them 503, and prints one JSON line.
``CALLS`` identifies, each about a different person, are handed to flask-koala at once
(``KOALA_MAX_WORKERS`` = 4, the default retry policy); the figure is the share delivered
within ``WINDOW`` seconds. A call waiting for its retry must hold no worker: if it did, the
four workers would spend the window asleep and deliver a few calls a second. Then the rest
is flushed (bounded) to check that every call ended sent or ``retries_exhausted``, once.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

from .apps import USER, build, traits


def main(argv: list[str]) -> dict[str, Any]:
    url, calls, window = argv[0], int(argv[1]), float(argv[2])
    app = build("koala", url)
    with app.app_context():
        koala = app.extensions["bench_koala"]
        people = [str(uuid.uuid4()) for _ in range(calls)]
        start = time.perf_counter()
        for profile_id in people:
            koala.identify(USER.email, traits(USER), profile_id=profile_id)
        while time.perf_counter() - start < window and koala.stats["sent"] < calls:
            time.sleep(0.05)
        in_window = koala.stats["sent"]
        elapsed = min(time.perf_counter() - start, window)
        flushed = koala.flush(timeout=120)
        stats = dict(koala.stats)
        koala.shutdown(timeout=5)
    return {
        "calls": calls,
        "window": window,
        "in_window": in_window,
        "elapsed": elapsed,
        "sent": stats["sent"],
        "exhausted": stats.get("failed.retries_exhausted", 0),
        "retried": stats["retried"],
        "flushed": flushed,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
