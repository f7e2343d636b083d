"""Figure 2: process CPU per delivered identify, against a raw keep-alive POST.

Runs in a fresh process (``python -m benchmarks.cpu URL N ROUNDS``) holding nothing but the
two apps and one ``http.client`` connection, and prints one JSON line. Each round, in a
shuffled order:

- ``bare``: N logins through the Flask test client, Flask-Login only;
- ``koala``: N logins with flask-koala, then ``flush()``, so every identify was delivered
  (a fresh visitor id per login, so none is merged with another);
- ``raw``: N POSTs of the same identify body over one keep-alive ``http.client`` connection;
- ``transport``: N POSTs of that body through flask-koala's own transport alone, so the
  HTTP part of the worker's cost can be told from the rest.

CPU is ``time.process_time()``: every thread of this process, user and system, so the
delivery threads and their wake-ups are counted. Per identify: ``(koala - bare) / N``,
medians over the rounds; the ratio to ``raw`` is also given per round, for its spread.
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

from flask_koala._transport import HTTPTransport

from .apps import PUBLIC_KEY, USER, build, koala_body
from .stats import median


def main(argv: list[str]) -> dict[str, Any]:
    url, n, rounds = argv[0], int(argv[1]), int(argv[2])
    bare = build("bare", url).test_client()
    koala_app = build("koala", url)
    koala = koala_app.test_client()
    flush: Callable[[], bool] = koala_app.extensions["bench_flush"]

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port)
    path = f"/web/projects/{PUBLIC_KEY}/batch"
    body = json.dumps(koala_body(str(uuid.uuid4()), USER), separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "bench"}

    def logins(client: Any) -> None:
        for _ in range(n):
            client.set_cookie("ko_id", str(uuid.uuid4()))
            client.post("/login")

    def run_bare() -> None:
        logins(bare)

    def run_koala() -> None:
        logins(koala)
        if not flush():
            raise RuntimeError("flask-koala did not deliver everything")

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

    runs = {"bare": run_bare, "koala": run_koala, "raw": run_raw, "transport": run_transport}
    for run in runs.values():  # warm up: imports, connections, worker threads
        run()
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            start = time.process_time()
            runs[name]()
            cpu[name].append(time.process_time() - start)
    per = {name: median(values) / n for name, values in cpu.items()}
    transport.close()
    with koala_app.app_context():
        koala_app.extensions["bench_koala"].shutdown(timeout=5)
    ratios = [(k - b) / r for k, b, r in zip(cpu["koala"], cpu["bare"], cpu["raw"])]
    return {
        "koala_per_call": per["koala"] - per["bare"],
        "raw_per_call": per["raw"],
        "transport_per_call": per["transport"],
        "bare_per_login": per["bare"],
        "ratio_median": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "calls": n * rounds,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
