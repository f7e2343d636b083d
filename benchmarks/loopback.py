"""Starting and steering the benchmark's own processes: the receiver and the app servers."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: this checkout importable, no proxy for loopback."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


class ReceiverProcess:
    """``python -m benchmarks.receiver`` as a child, steered through its stdin.

    Attributes:
        koala_url: base URL of the loopback Koala (``KOALA_API_URL``), which checks every
            body against Koala's contract.
        sink_url: base URL of a sink that answers every POST ``200 {}`` and checks nothing
            (:mod:`benchmarks.sink`): where figure 1's variants send.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.receiver", "--delay", str(delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=ROOT,
        )
        urls = json.loads(self._line())
        self.koala_url: str = urls["koala"]
        self.sink_url: str = urls["sink"]

    def _line(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark receiver exited unexpectedly")
        return line.strip()

    def command(self, text: str) -> str:
        """Send one command (``delay 0.05``, ``count``, ``reset``); return the answer."""
        stdin: IO[str] | None = self._process.stdin
        assert stdin is not None
        stdin.write(text + "\n")
        stdin.flush()
        return self._line()

    def close(self) -> None:
        """End the receiver: close its stdin, then wait (or kill it)."""
        if self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> ReceiverProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def gunicorn(app: str, env: dict[str, str], threads: int = 4) -> Iterator[tuple[str, int]]:
    """Serve ``app`` (``module:factory(...)``) with gunicorn's threaded worker on loopback.

    The socket is bound here and handed over by descriptor, so the port is known before
    gunicorn starts and nothing can take it in between. Yields ``(host, port)``.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it; without it gunicorn's separate header and body
    # writes meet the client's delayed ACK and some responses stall for 40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    fd = sock.fileno()
    command: list[str] = [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        "gthread",
        "--workers",
        "1",
        "--threads",
        str(threads),
        "--keep-alive",
        "600",
        "--bind",
        f"fd://{fd}",
        "--log-level",
        "warning",
        *_no_control_socket(),
        app,
    ]
    process = subprocess.Popen(command, pass_fds=(fd,), env=env, cwd=ROOT)
    try:
        yield "127.0.0.1", int(sock.getsockname()[1])
    finally:
        sock.close()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _no_control_socket() -> list[str]:
    """Newer gunicorns open a control socket at one fixed path; several at once collide."""
    from gunicorn.config import KNOWN_SETTINGS  # type: ignore[import-untyped]

    if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
        return ["--no-control-socket"]
    return []
