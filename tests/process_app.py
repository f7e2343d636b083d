"""An app for tests that run it in another process: under gunicorn, or as a script.

Settings come from the environment: ``KOALA_API_URL``, ``KOALA_SYNC`` (``1`` turns it
on), and for the script mode ``KOALA_SHUTDOWN_TIMEOUT`` and the number of identifies to
accept.
"""

from __future__ import annotations

import os
import sys

from flask import Flask

from flask_koala import Koala

from .support import build_app

koala = Koala()


def create_app() -> Flask:
    config = {
        "KOALA_API_URL": os.environ["KOALA_API_URL"],
        "KOALA_SHUTDOWN_TIMEOUT": float(os.environ.get("KOALA_SHUTDOWN_TIMEOUT", "2")),
        "KOALA_SYNC": os.environ.get("KOALA_SYNC") == "1",
    }
    return build_app(config, koala)


app = create_app()

if os.environ.get("KOALA_TEST_WARM_UP"):
    # Start the engine in the master before gunicorn forks, as an app that identifies
    # during start-up would: the workers must not inherit its threads or queue.
    with app.app_context():
        koala.identify("warmup@example.com", profile_id="00000000-0000-4000-8000-000000000000")


def main(count: int) -> None:
    """Accept ``count`` identifies and return without flushing: the exit hook must."""
    with app.app_context():
        for n in range(count):
            koala.identify(f"user{n}@example.com", profile_id=f"3f2504e0-4f89-41d3-9a0c-{n:012d}")
    print("accepted", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
