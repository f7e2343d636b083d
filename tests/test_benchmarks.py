"""The benchmark runs end to end; its figures are never asserted (tests never time things)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.sink import ANSWER, Sink

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(module: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.<module> ARGS`` with this checkout importable; 2 minutes at most."""
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_benchmark_smoke_run_prints_every_figure() -> None:
    result = run_benchmark("run", "--smoke")
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^([0-5]b?)\. .*(?:PASS|FAIL|n/a)$", result.stdout, re.MULTILINE)
    assert rows == ["0", "0b", "1", "1b", "2", "2b", "3", "4", "5"], result.stdout
    assert "load average" in result.stdout  # the run's conditions


@pytest.mark.slow
def test_celery_benchmark_prints_its_cpu_rate_and_paced_figures() -> None:
    from .celery_support import skip_without_redis

    skip_without_redis()
    broker = os.environ.get("KOALA_TEST_REDIS_URL")
    env = {"KOALA_BENCH_REDIS_URL": broker} if broker else {}
    small = ("--logins", "5", "--calls", "20", "--rounds", "1", "--paced", "5")
    result = run_benchmark("celery_mode", *small, **env)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^(thread|celery \(publish off-thread\)) +\S", result.stdout, re.M)
    assert rows.count("thread") == 3, result.stdout  # logins, CPU and calls/s, paced
    assert rows.count("celery (publish off-thread)") == 3, result.stdout
    assert "1 ms apart" in result.stdout
    assert "10 ms apart" in result.stdout


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink()
    yield server
    server.close()


def _connect(sink: Sink) -> socket.socket:
    host, port = sink.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _answers(connection: socket.socket, count: int) -> bytes:
    received = b""
    while received.count(b"{}") < count:
        chunk = connection.recv(4096)
        if not chunk:  # closed: what came is the answer
            break
        received += chunk
    return received


def _post(body: bytes) -> bytes:
    return b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def test_sink_answers_each_request_on_a_kept_alive_connection(sink: Sink) -> None:
    with _connect(sink) as connection:
        for _ in range(2):
            connection.sendall(_post(b'{"a": 1}'))
            assert _answers(connection, 1) == ANSWER


def test_sink_waits_for_a_body_that_comes_in_pieces(sink: Sink) -> None:
    request = _post(b'{"profile_id": "x"}')
    with _connect(sink) as connection:
        connection.sendall(request[:-5])
        time.sleep(0.05)
        connection.sendall(request[-5:])
        assert _answers(connection, 1) == ANSWER


def test_sink_answers_two_requests_sent_at_once(sink: Sink) -> None:
    with _connect(sink) as connection:
        connection.sendall(_post(b"{}") + _post(b"[]"))
        assert _answers(connection, 2) == ANSWER * 2
