"""Real parts for the Celery tests: a Redis server, a Celery worker process, a web process.

Redis is Debian's ``redis-server`` started on a free loopback port, unless
``KOALA_TEST_REDIS_URL`` points at one already running (its database is flushed between
tests, so it must be a throwaway one). Workers and the web process are subprocesses of
``sys.executable`` with ``PYTHONPATH`` set to the worktree root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from .support import free_port

ROOT = Path(__file__).resolve().parent.parent
_START_TIMEOUT = 30.0


def skip_without_redis() -> None:
    """Skip when there is no Redis to test against, except in CI, where that is a failure."""
    if os.environ.get("KOALA_TEST_REDIS_URL") or shutil.which("redis-server"):
        return
    if os.environ.get("CI"):
        pytest.fail("redis-server is not installed and CI is set: the Celery tests must run")
    pytest.skip("redis-server is not installed (apt-get install redis-server)")


class RedisServer:
    """``redis-server`` on a free loopback port, without persistence, stopped by ``stop``."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                *options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def broker_idle(url: str, queue: str) -> bool:
    """Nothing waiting in the queue and nothing taken but unacknowledged (ETA'd retries)."""
    client = redis_client(url)
    try:
        return int(client.llen(queue)) == 0 and int(client.hlen("unacked")) == 0
    finally:
        client.close()


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _env(broker_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["KOALA_TEST_BROKER_URL"] = broker_url
    return env


class _Output:
    """Collects a subprocess's output lines on a thread; lets a test wait for one."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        stream.close()

    def wait_for(self, text: str, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: any(text in line for line in self.lines), timeout)

    def text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def join(self) -> None:
        self._thread.join(5)


class CeleryWorker:
    """``celery -A tests.celery_app worker -Q <queue> --pool=solo`` until ``stop``."""

    def __init__(self, broker_url: str, queue: str) -> None:
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.celery_app",
                "worker",
                "-Q",
                queue,
                "--pool=solo",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"koala-test-{os.getpid()}-{free_port()}@%h",
            ],
            cwd=ROOT,
            env=_env(broker_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = _Output(self._process.stdout)
        if not self.output.wait_for(" ready.", _START_TIMEOUT):
            self.stop()
            raise RuntimeError(f"the Celery worker did not start:\n{self.output.text()}")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self._process.wait(20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self.output.join()


class WebProcess:
    """``python -m tests.celery_web``: a web app in its own process, for exit and kill tests."""

    def __init__(
        self, broker_url: str, args: list[str], env: Optional[dict[str, str]] = None
    ) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.celery_web", *args],
            cwd=ROOT,
            env={**_env(broker_url), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = _Output(self._process.stdout)

    def wait_for(self, text: str, timeout: float = _START_TIMEOUT) -> bool:
        return self.output.wait_for(text, timeout)

    def wait(self, timeout: float = _START_TIMEOUT) -> int:
        """Wait for the process to end by itself; its exit code."""
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.output.join()
        return code

    def message_ids(self) -> list[str]:
        """The ``message_id`` of every call it accepted, as it printed them."""
        lines = self.output.lines
        return sorted(line.split()[1] for line in lines if line.startswith("message_id "))

    def kill(self) -> Optional[int]:
        """SIGKILL: no atexit hook, no flush, no goodbye."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
        code = self._process.wait(10)
        self.output.join()
        return code
