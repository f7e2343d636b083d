"""What celery mode costs a web process, next to thread mode: ``python -m benchmarks.celery_mode``.

Three apps differing only in ``KOALA_DISPATCHER`` (and a baseline with flask-koala
disabled) log in through Flask-Login's ``login_user``, each login with a fresh ``ko_id``,
in interleaved rounds. Printed per mode: the median login, what it adds to the baseline, and
the median time ``koala.identify()`` holds the request thread (the precise added cost). One
more line measures what publishing on the request thread would cost instead: a plain
``celery_app.send_task`` to the same Redis.

Then the web process's own work per call, request thread and background thread together:
``--calls`` identifies are queued in one request and drained, per round and mode. Printed:
the process CPU per call beyond the disabled baseline (thread mode: per *delivered*
identify; celery mode: per *published* one), and how many calls per second the drain
reaches, as medians with the lowest and highest round; next to them, a loop of Celery's
``send_task`` (how 0.1.0 published each call).

Last, the same per login at a login's pace: ``--paced`` logins per mode and round through the
test client, each response closed as a WSGI server closes it, with a pause after each (1 ms
and 10 ms). Each wake-up of a background thread then serves a login or a few, not a batch
of thousands: this is what a call costs a web process whose logins come one by one.

Needs ``redis-server`` (Debian package) or ``KOALA_BENCH_REDIS_URL``. The Koala receiver runs
in a process of its own so that its work does not blur the figures; no Celery worker runs
(tasks wait in Redis, in the queue ``koala-bench``, deleted at the end). Options:
``--logins N`` per mode and round, ``--calls N`` per mode and round of the CPU part,
``--rounds R``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from flask import Flask, jsonify
from flask_login import LoginManager, UserMixin, login_user

from flask_koala import Koala
from flask_koala._celery_publish import task_kwargs
from flask_koala._payload import Call
from flask_koala._retry import RetryPolicy
from flask_koala.celery import TASK_NAME

_RECEIVER = """
import sys
from flask_koala._receiver import KoalaReceiver
with KoalaReceiver() as koala:
    print(koala.url, flush=True)
    sys.stdin.read()
"""


QUEUE = "koala-bench"
BARE = "bare (flask-koala disabled)"
SEND_TASK = "send_task per call (0.1.0)"


class User(UserMixin):  # type: ignore[misc]
    def __init__(self) -> None:
        self.id = "jane"
        self.email = "jane@example.com"


USER = User()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis() -> Iterator[str]:
    url = os.environ.get("KOALA_BENCH_REDIS_URL")
    if url:
        yield url
        return
    if not shutil.which("redis-server"):
        sys.exit("needs redis-server (apt-get install redis-server) or KOALA_BENCH_REDIS_URL")
    port = free_port()
    server = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--daemonize", "no"),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait()


@contextmanager
def receiver() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _RECEIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdin is not None
    try:
        yield process.stdout.readline().strip()
    finally:
        process.stdin.close()
        process.wait()


def make_app(config: dict[str, Any], celery_app: Celery) -> tuple[Flask, Koala]:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="bench", KOALA_PUBLIC_KEY="pk_bench", **config)
    LoginManager(app).user_loader(lambda user_id: USER)

    @app.post("/login")
    def login() -> Any:
        login_user(USER)
        return jsonify(ok=True)

    # Identifies made by a view, as a login makes them: queued, woken once the response
    # is closed. (A request context pushed by hand has no response to wait for, so its
    # calls wake the background threads at once, one by one.)
    held: list[float] = []
    app.extensions["bench_identify_held"] = held

    @app.post("/identify")
    def identify_one() -> str:
        start = time.perf_counter()
        koala.identify(USER.email)
        held.append(time.perf_counter() - start)
        return "ok"

    @app.post("/identify/<int:n>")
    def identify_many(n: int) -> str:
        for i in range(n):
            koala.identify(f"user{i}@example.com")
        return "ok"

    koala = Koala(app, celery=celery_app)
    return app, koala


def time_logins(app: Flask, koala: Koala, n: int, *, idle: bool) -> list[float]:
    """Logins back to back, or each on an idle process (after a pause and a flush, untimed)."""
    client = app.test_client()
    times = []
    for _ in range(n):
        client.set_cookie("ko_id", str(uuid.uuid4()))
        start = time.perf_counter()
        client.post("/login")
        times.append(time.perf_counter() - start)
        if idle:
            # The same pause for every mode (a baseline that skipped it would compare a
            # warm process with one woken from sleep), long enough for the delivery.
            time.sleep(0.02)
            with app.app_context():
                koala.flush(60)
    return times


def time_identify(app: Flask, koala: Koala, n: int) -> list[float]:
    """How long each of ``n`` identifies, made by a view a request each, held its request."""
    client = app.test_client()
    held: list[float] = app.extensions["bench_identify_held"]
    held.clear()
    for _ in range(n):
        client.set_cookie("ko_id", str(uuid.uuid4()))
        client.post("/identify").close()
    return list(held)


def time_send_task(celery_app: Celery, endpoint: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        call = Call.identify(profile_id=str(uuid.uuid4()), email=USER.email, traits={})
        kwargs = task_kwargs(call, endpoint=endpoint, timeout=5.0, policy=RetryPolicy())
        start = time.perf_counter()
        celery_app.send_task(TASK_NAME, kwargs=kwargs, queue=QUEUE, serializer="json")
        times.append(time.perf_counter() - start)
    return times


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


def drain(app: Flask, koala: Koala, n: int) -> tuple[float, float]:
    """CPU seconds of the whole process per call, and calls per second drained.

    The calls are queued in one request (one visitor, a different email each, so each is a
    batch of its own); its end wakes the background threads, and ``flush`` waits for the
    last call to end: delivered, or published.
    """
    client = app.test_client()
    client.set_cookie("ko_id", str(uuid.uuid4()))
    cpu = time.process_time()
    response = client.post(f"/identify/{n}")
    start = time.perf_counter()
    response.close()  # as a WSGI server closes it: the wake-up
    with app.app_context():
        assert koala.flush(120), "the calls did not end"
    seconds = time.perf_counter() - start
    return (time.process_time() - cpu) / n, n / seconds


def send_task_loop(celery_app: Celery, endpoint: str, n: int) -> tuple[float, float]:
    """CPU seconds per call and calls per second of ``send_task`` in a loop."""
    calls = [
        Call.identify(profile_id=str(uuid.uuid4()), email=USER.email, traits={}) for _ in range(n)
    ]
    cpu, start = time.process_time(), time.perf_counter()
    for call in calls:
        kwargs = task_kwargs(call, endpoint=endpoint, timeout=5.0, policy=RetryPolicy())
        celery_app.send_task(TASK_NAME, kwargs=kwargs, queue=QUEUE, serializer="json")
    return (time.process_time() - cpu) / n, n / (time.perf_counter() - start)


def spread(values: list[float]) -> str:
    """Median [lowest-highest], whole numbers."""
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def cpu_figures(
    apps: dict[str, tuple[Flask, Koala]], celery_app: Celery, endpoint: str, calls: int, rounds: int
) -> None:
    """Print the CPU per call and calls per second of each mode, side by side."""
    cpu: dict[str, list[float]] = {name: [] for name in apps}
    rate: dict[str, list[float]] = {name: [] for name in apps}
    cpu[SEND_TASK], rate[SEND_TASK] = [], []
    for app, koala in apps.values():
        drain(app, koala, 50)  # warm up: threads started, connections open
    for _ in range(rounds):
        for name, (app, koala) in apps.items():
            c, r = drain(app, koala, calls)
            cpu[name].append(c)
            rate[name].append(r)
        c, r = send_task_loop(celery_app, endpoint, calls)
        cpu[SEND_TASK].append(c)
        rate[SEND_TASK].append(r)
    base = statistics.median(cpu[BARE])
    print()
    print(f"web-process work per call: median [lowest-highest] of {rounds} rounds of {calls} calls")
    print(f"{'':28} {'CPU per call, added (µs)':>26} {'calls/s':>22}")
    for name in cpu:
        if name != BARE:
            added = [(c - base) * 1e6 for c in cpu[name]]
            print(f"{name:28} {spread(added):>26} {spread(rate[name]):>22}")
    print(
        "CPU per call: the whole process's CPU (request and background threads) from the\n"
        "first identify to the last call's end, beyond the same loop with flask-koala\n"
        "disabled. Thread mode ends a call when Koala answered (a delivered identify),\n"
        "celery mode when the broker took it (a published one). calls/s: from the end of\n"
        "the request that queued them to the last one's end (send_task: the whole loop)."
    )


#: The pauses after each login of the paced figure, in seconds.
PAUSES = (0.001, 0.01)


def paced(app: Flask, koala: Koala, n: int, pause: float) -> float:
    """CPU seconds of the whole process per login, logins ``pause`` apart, all delivered."""
    client = app.test_client()
    cpu = time.process_time()
    for _ in range(n):
        client.set_cookie("ko_id", str(uuid.uuid4()))
        client.post("/login").close()  # a WSGI server closes it: the background thread wakes
        time.sleep(pause)
    with app.app_context():
        assert koala.flush(120), "the calls did not end"
    return (time.process_time() - cpu) / n


def paced_figures(apps: dict[str, tuple[Flask, Koala]], logins: int, rounds: int) -> None:
    """Print the CPU each mode adds per login at a login's pace, side by side."""
    print()
    print(f"web-process work per login, paced: median [lowest-highest] of {rounds} rounds")
    print(f"{'':28} " + " ".join(f"{f'{p * 1e3:.0f} ms apart (µs)':>24}" for p in PAUSES))
    added: dict[str, list[str]] = {name: [] for name in apps if name != BARE}
    for pause in PAUSES:
        cpu: dict[str, list[float]] = {name: [] for name in apps}
        for app, koala in apps.values():
            paced(app, koala, 20, pause)  # warm up
        for _ in range(rounds):
            for name, (app, koala) in apps.items():
                cpu[name].append(paced(app, koala, logins, pause))
        base = statistics.median(cpu[BARE])
        for name in added:
            added[name].append(spread([(c - base) * 1e6 for c in cpu[name]]))
    for name, cells in added.items():
        print(f"{name:28} " + " ".join(f"{cell:>24}" for cell in cells))
    print(
        "CPU per login: the whole process's CPU for the logins (a fresh ko_id each) and their\n"
        "calls' ends, beyond the same logins with flask-koala disabled: the request side, the\n"
        "wake-ups after each response and the delivery (thread) or the publish (celery)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=500, help="logins per mode and round")
    parser.add_argument("--calls", type=int, default=3000, help="calls per mode and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--paced", type=int, default=300, help="paced logins per mode and round")
    args = parser.parse_args()
    with redis() as broker, receiver() as koala_url:
        celery_app = Celery("bench", broker=broker)
        common = {
            "KOALA_API_URL": koala_url,
            "KOALA_MAX_QUEUE_SIZE": 1_000_000,
            "KOALA_CELERY_QUEUE": QUEUE,
        }
        modes: dict[str, dict[str, Any]] = {
            BARE: {"KOALA_ENABLED": False},
            "thread": {"KOALA_DISPATCHER": "thread"},
            "celery (publish off-thread)": {"KOALA_DISPATCHER": "celery"},
        }
        apps = {name: make_app({**common, **cfg}, celery_app) for name, cfg in modes.items()}
        busy: dict[str, list[float]] = {name: [] for name in apps}
        idle: dict[str, list[float]] = {name: [] for name in apps}
        identify: dict[str, list[float]] = {name: [] for name in apps}
        publish: list[float] = []
        endpoint = f"{koala_url}/web/projects/pk_bench/batch"
        time_logins(*apps[BARE], 50, idle=False)  # warm up
        for _ in range(args.rounds):
            for name, (app, koala) in apps.items():
                idle[name] += time_logins(app, koala, args.logins, idle=True)
                busy[name] += time_logins(app, koala, args.logins, idle=False)
                identify[name] += time_identify(app, koala, args.logins)
                with app.app_context():
                    koala.flush(60)
            publish += time_send_task(celery_app, endpoint, args.logins)
        print(f"medians of {args.rounds * args.logins} logins per mode and column")
        print(
            f"{'':28} {'identify() holds':>17} {'login, idle':>12} {'added':>10}"
            f" {'login, busy':>12} {'added':>10}"
        )
        base_idle, base_busy = statistics.median(idle[BARE]), statistics.median(busy[BARE])
        for name in apps:
            held = "" if name == BARE else us(statistics.median(identify[name]))
            i, b = statistics.median(idle[name]), statistics.median(busy[name])
            added_i = "" if name == BARE else us(i - base_idle)
            added_b = "" if name == BARE else us(b - base_busy)
            print(f"{name:28} {held:>17} {us(i):>12} {added_i:>10} {us(b):>12} {added_b:>10}")
        sync = statistics.median(publish)
        print(f"{'publish in the view':28} {us(sync):>17}")
        print(
            "idle: the process had finished the previous login's work; busy: logins back to\n"
            "back, the background thread's work sharing the GIL; publish in the view: one\n"
            "send_task to Redis, what apply_async on the request thread would hold it for."
        )
        cpu_figures(apps, celery_app, endpoint, args.calls, args.rounds)
        paced_figures(apps, args.paced, args.rounds)
        for app, koala in apps.values():
            with app.app_context():
                koala.shutdown(10)
        delete_queue(broker)


def delete_queue(url: str) -> None:
    import redis as redis_client

    client = redis_client.Redis.from_url(url)
    client.delete(QUEUE)
    client.close()


if __name__ == "__main__":
    main()
