"""The engine in real processes: gunicorn with --preload, and a plain interpreter exit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flask_koala._receiver import KoalaReceiver

from .support import communicate, free_port, kill

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def env_for(api_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["KOALA_API_URL"] = api_url
    env.update(extra)
    return env


def run_python(code: str, env: dict[str, str], timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter at the project root; its output, once it exited 0."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listening on {port}")


def person(n: int) -> str:
    return f"3f2504e0-4f89-41d3-9a0c-{n:012d}"


@contextlib.contextmanager
def serve(receiver: KoalaReceiver, *options: str) -> Iterator[str]:
    """Run tests.process_app under gunicorn with two workers; yield its URL."""
    binary = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("gunicorn is not installed (pip install -e '.[dev]')")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            *options,
            "--workers",
            "2",
            "--bind",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "5",
            "tests.process_app:app",
        ],
        cwd=ROOT,
        env=env_for(receiver.url, KOALA_TEST_WARM_UP="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # so a kill on timeout takes the workers too
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        _, stderr = communicate(proc, timeout=20)
        assert proc.returncode == 0, stderr.decode()
    assert b"WORKER TIMEOUT" not in stderr, stderr.decode()


@pytest.fixture
def gunicorn(receiver: KoalaReceiver) -> Iterator[str]:
    with serve(receiver, "--preload") as url:
        yield url


def log_in_twenty(url: str, receiver: KoalaReceiver) -> None:
    with requests.Session() as http:
        for n in range(20):
            # A fresh connection each time, so both workers get logins.
            response = http.post(
                f"{url}/login/jane",
                cookies={"ko_id": person(n)},
                headers={"Connection": "close"},
                timeout=10,
            )
            assert response.status_code == 200
    assert receiver.wait_for(21, timeout=20)  # 20 logins and the master's warm-up call
    profiles = {body["profile_id"] for body in receiver.bodies}
    assert {person(n) for n in range(20)} <= profiles
    assert len(receiver.bodies) == 21  # no worker re-sent the master's call
    assert receiver.violations == []


def test_gunicorn_preload_workers_deliver_logins(gunicorn: str, receiver: KoalaReceiver) -> None:
    log_in_twenty(gunicorn, receiver)


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_gunicorn_gevent_workers_deliver_logins(receiver: KoalaReceiver, preload: bool) -> None:
    # With --preload the engine is built (and here even started) in the master, before the
    # worker monkey-patches threading: its locks are real ones under green threads.
    pytest.importorskip("gevent")
    options = ["--worker-class", "gevent", "--timeout", "10"]
    with serve(receiver, *options, *(["--preload"] if preload else [])) as url:
        if preload:
            log_in_twenty(url, receiver)
            return
        with requests.Session() as http:
            for n in range(20):
                response = http.post(
                    f"{url}/login/jane",
                    cookies={"ko_id": person(n)},
                    headers={"Connection": "close"},
                    timeout=10,
                )
                assert response.status_code == 200
        # Without --preload each worker imports the app and warms up on its own.
        assert receiver.wait_for(22, timeout=20)
        profiles = {body["profile_id"] for body in receiver.bodies}
        assert {person(n) for n in range(20)} <= profiles
        assert receiver.violations == []


def run_script(api_url: str, count: int, shutdown_timeout: str) -> tuple[float, str]:
    """Run the script; return seconds from 'accepted' to exit, and its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.process_app", str(count)],
        cwd=ROOT,
        env=env_for(api_url, KOALA_SHUTDOWN_TIMEOUT=shutdown_timeout),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "accepted"
    except BaseException:
        kill(proc)
        raise
    accepted = time.monotonic()
    _, stderr = communicate(proc, timeout=30)
    elapsed = time.monotonic() - accepted
    assert proc.returncode == 0, stderr
    return elapsed, stderr


def test_exit_without_flush_delivers_everything(receiver: KoalaReceiver) -> None:
    _, stderr = run_script(receiver.url, 50, "5")
    assert len(receiver.bodies) == 50
    assert stderr == ""


def test_exit_with_koala_down_is_bounded_and_quiet() -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    elapsed, stderr = run_script(down, 10, "1")
    assert elapsed <= 1 + 3  # the 1 s exit flush, with room for a loaded machine
    assert stderr == ""


def test_exit_with_koala_hanging_is_bounded() -> None:
    with KoalaReceiver() as hanging:
        hanging.delay(30)
        elapsed, stderr = run_script(hanging.url, 10, "1")
    assert elapsed <= 1 + 3  # the 1 s exit flush, far short of the 30 s the receiver holds
    assert stderr == ""


def test_exit_warns_once_with_the_number_left_where_logging_is_set_up() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    code = (
        "import logging, sys; logging.basicConfig(stream=sys.stdout, format='%(message)s');"
        "from tests.process_app import main; main(10)"
    )
    output = run_python(code, env_for(down, KOALA_SHUTDOWN_TIMEOUT="0.5"), timeout=30)
    lines = [line for line in output.splitlines() if line.startswith("flask-koala")]
    assert lines == ["flask-koala: exiting with 10 call(s) not delivered after 0.5s"]


def test_multiprocessing_child_delivers_its_calls_before_exiting(receiver: KoalaReceiver) -> None:
    # A multiprocessing child ends with os._exit(), which skips atexit handlers.
    code = """
import multiprocessing
from tests.process_app import app, koala, main

def child():
    main(5)

with app.app_context():
    koala.identify("parent@example.com", profile_id="00000000-0000-4000-8000-000000000001")
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(30)
    assert process.exitcode == 0, process.exitcode
    koala.flush(10)
"""
    run_python(code, env_for(receiver.url))
    assert len(receiver.bodies) == 6  # the parent's one, and the child's five


def test_sync_mode_set_up_before_gevent_patched_gives_each_greenlet_its_connection(
    receiver: KoalaReceiver,
) -> None:
    # gunicorn -k gevent --preload with KOALA_SYNC: init_app runs before the patch, and a
    # thread-local made then is one slot for every greenlet, so they shared one socket.
    pytest.importorskip("gevent")
    code = """
from tests.process_app import app, koala
from gevent import monkey; monkey.patch_all()
import gevent, json

def identify(n):
    with app.app_context():
        koala.identify(f"user{n}@example.com", profile_id=f"3f2504e0-4f89-41d3-9a0c-{n:012d}")

gevent.joinall([gevent.spawn(identify, n) for n in range(10)], timeout=30)
with app.app_context():
    print(json.dumps(dict(koala.stats)))
"""
    receiver.delay(0.05)  # every greenlet is inside its request at once
    output = run_python(code, env_for(receiver.url, KOALA_SYNC="1"))
    stats = json.loads(output)
    assert (stats["sent"], stats["retried"], stats["failed"]) == (10, 0, 0)
    assert len(receiver.bodies) == 10


def test_exit_under_gevent_patched_after_the_engine_is_bounded() -> None:
    pytest.importorskip("gevent")
    code = (
        "from tests.process_app import main;"
        "from gevent import monkey; monkey.patch_all();"
        "import time; start = time.monotonic(); main(10)"
    )
    with KoalaReceiver() as hanging:
        hanging.delay(30)
        start = time.monotonic()
        output = run_python(code, env_for(hanging.url, KOALA_SHUTDOWN_TIMEOUT="1"), timeout=30)
        elapsed = time.monotonic() - start
    assert output.strip() == "accepted"
    # The 1 s exit flush, plus starting an interpreter and gevent on a loaded machine: far
    # short of the 30 s the receiver holds each call.
    assert elapsed <= 1 + 8


def test_exit_counts_calls_in_flight_as_dropped_not_pending() -> None:
    # The reporter is registered before flask_koala, so it runs after flask-koala's hook.
    code = """
import atexit, json
def report():
    from tests.process_app import app, koala
    with app.app_context():
        stats = dict(koala.stats)
    print(json.dumps({k: stats.get(k, 0) for k in ("pending", "dropped.shutdown", "sent")}))
atexit.register(report)
from tests.process_app import main
main(3)
"""
    with KoalaReceiver() as hanging:
        hanging.delay(30)
        output = run_python(code, env_for(hanging.url, KOALA_SHUTDOWN_TIMEOUT="0.5"), timeout=30)
    counts = json.loads(output.splitlines()[-1])
    assert counts == {"pending": 0, "dropped.shutdown": 3, "sent": 0}
