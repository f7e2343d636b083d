"""`make demo` as a user runs it: a login makes the receiver print the identify call."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
PROFILE_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Demo:
    """``python -m examples.demo`` in a subprocess, its output read line by line."""

    def __init__(self, port: int | None = None, receiver_port: int | None = None) -> None:
        self.port = port or free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(DEMO_PORT=str(self.port), DEMO_RECEIVER_PORT=str(receiver_port or free_port()))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "examples.demo"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.output.append(line)
            if text in line:
                return True
        return False

    def stop(self) -> int:
        """Ctrl-C, then collect the rest of the output (the reader thread owns stdout)."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=20)
        self._reader.join(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return code


@pytest.fixture
def start_demo() -> Iterator[Callable[..., Demo]]:
    started: list[Demo] = []

    def start(**ports: int) -> Demo:
        demo = Demo(**ports)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        if demo.proc.poll() is None:
            demo.proc.kill()
            demo.proc.wait()
        demo._reader.join(timeout=10)
        if demo.proc.stdout is not None:
            demo.proc.stdout.close()


@pytest.fixture
def demo(start_demo: Callable[..., Demo]) -> Demo:
    return start_demo()


def test_curl_login_is_printed_by_the_receiver(demo: Demo) -> None:
    assert demo.wait_for("Ctrl-C stops everything")
    banner = "".join(demo.output)
    assert "KOALA_PUBLIC_KEY" in banner
    assert "KOALA_API_URL" in banner
    response = requests.post(
        f"http://127.0.0.1:{demo.port}/login",
        data={"email": "demo@example.com", "password": "koala"},
        cookies={"ko_id": PROFILE_ID},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 302
    assert demo.wait_for(f"profile_id {PROFILE_ID[:8]}-…")
    assert demo.wait_for("identify traits")
    assert demo.stop() == 0
    output = "".join(demo.output)
    assert "flask-koala demo stopped." in output
    assert "Traceback" not in output


def test_the_page_serves_the_stand_in_sdk(demo: Demo) -> None:
    assert demo.wait_for("Ctrl-C stops everything")
    page = requests.get(f"http://127.0.0.1:{demo.port}/", timeout=10).text
    assert "koala-stand-in-sdk.js" in page
    sdk = requests.get(f"http://127.0.0.1:{demo.port}/static/koala-stand-in-sdk.js", timeout=10)
    assert "ko_id=" in sdk.text
    assert demo.stop() == 0


def test_a_login_without_cookie_is_printed_with_why(demo: Demo) -> None:
    assert demo.wait_for("Ctrl-C stops everything")
    response = requests.post(
        f"http://127.0.0.1:{demo.port}/login",
        data={"email": "demo@example.com", "password": "koala"},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 302
    assert demo.wait_for("login NOT sent to Koala: skipped (no_cookie)")
    assert "ko_id" in demo.output[-1]
    assert demo.stop() == 0


@pytest.mark.parametrize("variable", ["DEMO_PORT", "DEMO_RECEIVER_PORT"])
def test_port_in_use_names_the_variable_to_set(
    start_demo: Callable[..., Demo], variable: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"port": port} if variable == "DEMO_PORT" else {"receiver_port": port}
        demo = start_demo(**ports)
        assert demo.wait_for(f"port {port} on 127.0.0.1 is already in use")
        assert demo.proc.wait(timeout=20) == 1
    demo._reader.join(timeout=10)
    while not demo.lines.empty():
        demo.output.append(demo.lines.get())
    output = "".join(demo.output)
    assert f"{variable}={port + 1} make demo" in output
    assert "Traceback" not in output
