"""What flask-koala adds to a request that logs nobody in: a page view.

Usage: ``python -m benchmarks.page_view REQUESTS ROUNDS``; prints one JSON line.

Three apps of :mod:`benchmarks.apps` with a ``GET /page`` view that returns a short text:
the bare app twice (the second is the noise floor) and the app with flask-koala. Each
round, in a shuffled order, every app serves REQUESTS page views through its WSGI stack,
each response read and closed as a server does. The figure is CPU time per page view
(``time.process_time``) added over the bare app, median over rounds, with the middle half
of the rounds' added times as the spread. No call is made, so no receiver is needed.
"""

from __future__ import annotations

import io
import json
import random
import sys
import time
from typing import Any

from flask import Flask

from .apps import build
from .stats import median, rounds_spread

VARIANTS = ("bare", "bare_again", "koala")


def _app(variant: str) -> Flask:
    app = build("bare" if variant == "bare_again" else variant, "http://127.0.0.1:9")
    app.add_url_rule("/page", "page", lambda: "Hello")
    return app


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return len  # the write() callable, which nothing here calls


def _round(app: Flask, requests: int) -> float:
    """CPU seconds per page view over ``requests`` of them."""
    wsgi = app.wsgi_app
    environs = [
        {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/page",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(),
            "wsgi.errors": sys.stderr,
            "HTTP_COOKIE": "ko_id=3f2504e0-4f89-41d3-9a0c-0305e82c3301",
        }
        for _ in range(requests)
    ]
    start = time.process_time()
    for environ in environs:
        body = wsgi(environ, _start_response)
        b"".join(body)
        body.close()  # type: ignore[attr-defined]
    return (time.process_time() - start) / requests


def measure(requests: int, rounds: int) -> dict[str, Any]:
    apps = {variant: _app(variant) for variant in VARIANTS}
    for app in apps.values():
        _round(app, requests)  # warm up
    per_round: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    order = list(VARIANTS)
    for _ in range(rounds):
        random.shuffle(order)
        for variant in order:
            per_round[variant].append(_round(apps[variant], requests))
    bare = per_round["bare"]
    return {
        "requests": requests,
        "rounds": rounds,
        "bare": median(bare),
        "koala": rounds_spread([k - b for k, b in zip(per_round["koala"], bare)]),
        "control": rounds_spread([c - b for c, b in zip(per_round["bare_again"], bare)]),
    }


def main(argv: list[str]) -> dict[str, Any]:
    return measure(int(argv[0]), int(argv[1]))


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
