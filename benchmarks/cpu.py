"""Figure 2: process CPU per delivered identify, against a raw keep-alive POST.

Runs in a fresh process (``python -m benchmarks.cpu URL N ROUNDS``) holding nothing but the
apps and one ``http.client`` connection, and prints one JSON line. Each round, in a
shuffled order:

- ``bare``: N logins through the Flask test client, Flask-Login only;
- ``koala``: N logins with flask-koala, then ``flush()``, so every identify was delivered
  (a fresh visitor id per login, so none is merged with another). flask-koala wakes its
  workers when a response is closed, and the test client leaves its responses open: the
  workers deliver the round inside ``flush()``, while the request thread waits. This is
  the work per identify, request side and delivery, held against the target;
- ``woken``: the same on a second app whose responses are closed after each login, as a
  WSGI server closes them: the workers wake after each login and deliver while the next
  logins run, so they also pay for competing with them for the GIL (figure 2b, no target);
- ``raw``: N POSTs of the same identify body over one keep-alive ``http.client`` connection;
- ``transport``: N POSTs of that body through flask-koala's own transport alone, so the
  HTTP part of the worker's cost can be told from the rest.

CPU is ``time.process_time()``: every thread of this process, user and system, so the
delivery threads and their wake-ups are counted. Per identify and round: ``(koala - bare)
/ N``, and its ratio to that round's ``raw``. Rounds are short and many, so that a round is
compared with its neighbours in time and the machine's load drifts less between them; each
figure is the median over the rounds, with the quartiles and the extremes beside it.
"""

from __future__ import annotations

import http.client
import json
import random
import sys
import time
import uuid
from typing import Any, Callable
from urllib.parse import urlsplit

from flask import Flask

from flask_koala._transport import HTTPTransport

from .apps import PUBLIC_KEY, USER, build, koala_body
from .stats import median, rounds_spread


def _pending(app: Flask) -> int:
    """Calls the app's engine has not ended yet."""
    with app.app_context():
        return int(app.extensions["koala"].pipeline.dispatcher.pending)


def main(argv: list[str]) -> dict[str, Any]:
    url, n, rounds = argv[0], int(argv[1]), int(argv[2])
    bare = build("bare", url).test_client()
    apps = {name: build("koala", url) for name in ("koala", "woken")}

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port)
    path = f"/web/projects/{PUBLIC_KEY}/batch"
    body = json.dumps(koala_body(str(uuid.uuid4()), USER), separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "bench"}
    left: dict[str, list[float]] = {name: [] for name in apps}

    def logins(client: Any, *, close: bool = False) -> None:
        for _ in range(n):
            client.set_cookie("ko_id", str(uuid.uuid4()))
            response = client.post("/login")
            if close:
                response.close()  # what a WSGI server does once the response is sent

    def delivered(name: str, *, close: bool) -> Callable[[], None]:
        app = apps[name]
        client = app.test_client()
        flush: Callable[[], bool] = app.extensions["bench_flush"]

        def run() -> None:
            logins(client, close=close)
            left[name].append(_pending(app) / n)
            if not flush():
                raise RuntimeError("flask-koala did not deliver everything")

        return run

    def run_raw() -> None:
        for _ in range(n):
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()

    transport = HTTPTransport()
    endpoint = f"{url}{path}"

    def run_transport() -> None:
        for _ in range(n):
            transport.post(endpoint, body, headers, 5.0)

    runs = {
        "bare": lambda: logins(bare),
        "koala": delivered("koala", close=False),
        "woken": delivered("woken", close=True),
        "raw": run_raw,
        "transport": run_transport,
    }
    for run in runs.values():  # warm up: imports, connections, worker threads
        run()
    for shares in left.values():
        shares.clear()
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            start = time.process_time()
            runs[name]()
            cpu[name].append((time.process_time() - start) / n)
    transport.close()
    for app in apps.values():
        with app.app_context():
            app.extensions["bench_koala"].shutdown(timeout=5)
    result: dict[str, Any] = {
        "raw_per_call": median(cpu["raw"]),
        "transport_per_call": median(cpu["transport"]),
        "bare_per_login": median(cpu["bare"]),
        "calls": n * rounds,
        "rounds": rounds,
    }
    for name in apps:
        added = [k - b for k, b in zip(cpu[name], cpu["bare"])]
        result[name] = {
            "per_call": rounds_spread(added),
            "ratio": rounds_spread([a / r for a, r in zip(added, cpu["raw"])]),
            "left_for_flush": median(left[name]),
        }
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
