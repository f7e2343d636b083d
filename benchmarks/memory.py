"""Figure 4: how much memory a full backlog of identifies holds.

Runs in a fresh process (``python -m benchmarks.memory URL CALLS``) so that nothing else
allocated blurs the figure, against a receiver that never answers, and prints one JSON
line. After one warm-up call (which starts the workers and hangs in one of them), it reads
``VmRSS`` from ``/proc/self/status``, hands flask-koala ``CALLS`` identifies about as many
different users with realistic traits, and reads it again. Each user's traits are built
inside the loop and dropped after the call, as a request's would be, so the backlog is all
that keeps them alive and all of it is counted.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import uuid
from typing import Any

from .apps import build


def rss_bytes() -> int:
    """Resident set size of this process, from ``/proc/self/status``."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (not Linux?)")


def user_traits(i: int) -> dict[str, Any]:
    """What a real user's identify carries: ten traits of mixed types."""
    return {
        "email": f"user{i}@customer-{i % 997}.example.com",
        "name": f"User Number {i}",
        "first_name": "User",
        "last_name": f"Number {i}",
        "company": f"Customer {i % 997} Inc.",
        "plan": ("free", "growth", "enterprise")[i % 3],
        "role": "admin" if i % 7 == 0 else "member",
        "seats": i % 250,
        "is_trial": i % 2 == 0,
        "signed_up_at": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
        + datetime.timedelta(minutes=i),
    }


def main(argv: list[str]) -> dict[str, Any]:
    url, calls = argv[0], int(argv[1])
    # No retries meanwhile; room for the warm-up call, which the bound counts while it hangs.
    app = build("koala", url, config={"KOALA_TIMEOUT": 600.0, "KOALA_MAX_QUEUE_SIZE": calls + 1})
    with app.app_context():
        koala = app.extensions["bench_koala"]
        koala.identify("warm@example.com", {}, profile_id=str(uuid.uuid4()))
        gc.collect()
        before = rss_bytes()
        accepted = 0
        for i in range(calls):
            traits = user_traits(i)
            accepted += koala.identify(traits["email"], traits, profile_id=str(uuid.uuid4()))
        gc.collect()
        after = rss_bytes()
        stats = dict(koala.stats)
    return {
        "growth": after - before,
        "before": before,
        "calls": calls,
        "accepted": accepted,
        "dropped": stats["dropped"],
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
    os._exit(0)  # the receiver never answers: skip the exit flush, nothing to wait for
