"""`make demo` as a user runs it: a login makes the receiver print the identify call."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from typing import Callable

import pytest
import requests

from .support import PROFILE_ID, ROOT, Child, doc_section, free_port

pytestmark = pytest.mark.slow


def start_demo(spawn: Callable[..., Child], **ports: int) -> Child:
    """``python -m examples.demo``, on free ports but those given (``DEMO_PORT=...``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(DEMO_PORT=str(free_port()), DEMO_RECEIVER_PORT=str(free_port()))
    env.update({name: str(port) for name, port in ports.items()})
    return spawn([sys.executable, "-m", "examples.demo"], env=env)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def demo(spawn: Callable[..., Child], port: int) -> Child:
    return start_demo(spawn, DEMO_PORT=port)


def test_curl_login_is_printed_by_the_receiver(demo: Child, port: int) -> None:
    assert demo.wait_for("Ctrl-C stops everything")
    banner = demo.output
    assert "KOALA_PUBLIC_KEY" in banner
    assert "KOALA_API_URL" in banner
    response = requests.post(
        f"http://127.0.0.1:{port}/login",
        data={"email": "demo@example.com", "password": "koala"},
        cookies={"ko_id": PROFILE_ID},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 302
    assert demo.wait_for(f"profile_id {PROFILE_ID[:8]}-…")
    assert demo.wait_for("identify traits")
    assert demo.stop(signal.SIGINT) == 0
    assert "flask-koala demo stopped." in demo.output
    assert "Traceback" not in demo.output


def readme_curl_line() -> str:
    """README.md's curl line that logs the demo user in (the demo on its default port)."""
    section = doc_section("Try the demo, run the tests")
    blocks: list[str] = re.findall(r"```bash\n(.*?)```", section, re.S)
    (block,) = [b for b in blocks if "curl" in b]
    return block


@pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (apt-get install curl)"
)
def test_the_readmes_curl_line_logs_the_demo_user_in(demo: Child, port: int) -> None:
    assert demo.wait_for("Ctrl-C stops everything")
    command = readme_curl_line().replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "302", result.stderr  # logged in, sent on to the page
    assert demo.wait_for(f"profile_id {PROFILE_ID[:8]}-…")
    assert demo.wait_for("identify traits")


def test_the_page_serves_the_stand_in_sdk(demo: Child, port: int) -> None:
    assert demo.wait_for("Ctrl-C stops everything")
    page = requests.get(f"http://127.0.0.1:{port}/", timeout=10).text
    assert "koala-stand-in-sdk.js" in page
    sdk = requests.get(f"http://127.0.0.1:{port}/static/koala-stand-in-sdk.js", timeout=10)
    assert "ko_id=" in sdk.text
    assert demo.stop(signal.SIGINT) == 0


def test_a_login_without_cookie_is_printed_with_why(demo: Child, port: int) -> None:
    assert demo.wait_for("Ctrl-C stops everything")
    response = requests.post(
        f"http://127.0.0.1:{port}/login",
        data={"email": "demo@example.com", "password": "koala"},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 302
    assert demo.wait_for(re.escape("login NOT sent to Koala: skipped (no_cookie)"))
    assert "ko_id" in demo.seen[-1]
    assert demo.stop(signal.SIGINT) == 0


@pytest.mark.parametrize("variable", ["DEMO_PORT", "DEMO_RECEIVER_PORT"])
def test_port_in_use_names_the_variable_to_set(spawn: Callable[..., Child], variable: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        demo = start_demo(spawn, **{variable: port})
        assert demo.wait_for(re.escape(f"port {port} on 127.0.0.1 is already in use"))
        assert demo.wait() == 1
    assert f"{variable}={port + 1} make demo" in demo.output
    assert "Traceback" not in demo.output
