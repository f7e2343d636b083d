"""The terminal sessions the docs show, run as they are shown.

Each console block marked ``executed-by`` this file is a ``$`` command and, below it, what
it prints. The command runs in a folder holding ``yourapp.py`` (a Flask app with
flask-koala, aimed at a loopback receiver, and its Celery app), and what it prints is held
against the block, with what changes from run to run (ports, ids, times) left out.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
from flask import Flask

from flask_koala import Koala
from flask_koala._receiver import KoalaReceiver

from .celery_support import redis_client, wait_until
from .support import PROFILE_ID, ROOT, communicate
from .test_celery_worker import redis_url
from .test_cli import post_identify
from .test_docs_blocks import BLOCKS, Block

__all__ = ["redis_url"]  # a fixture, used by name

MARKER = "executed-by: tests/test_docs_commands.py"

YOURAPP = """
import os

from celery import Celery
from flask import Flask
from flask_login import LoginManager

from flask_koala import Koala

celery_app = Celery("yourapp", broker=os.environ.get("YOURAPP_BROKER", "redis://127.0.0.1:1/0"))
app = Flask("yourapp")
app.config.update(KOALA_PUBLIC_KEY="pk_example", KOALA_API_URL=os.environ["YOURAPP_KOALA_URL"])
LoginManager(app)
Koala(app, celery=celery_app)
"""


def session(page: str, command: str) -> Block:
    """The block of ``page`` whose ``$`` line runs ``command``."""
    (block,) = [
        b
        for b in BLOCKS
        if b.page == ROOT / page and b.marker == MARKER and f"$ {command}" in b.code
    ]
    return block


def shown(block: Block) -> tuple[str, list[str]]:
    """The block's command and the lines it shows printed."""
    first, *printed = block.code.rstrip("\n").split("\n")
    return first.removeprefix("$ "), [line.removeprefix("^C") for line in printed]


def steady(lines: list[str]) -> list[str]:
    """Lines without what differs between runs: ports, ids and times."""
    lines = [re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line) for line in lines]
    lines = [re.sub(r"message_id [0-9a-f]{8}-…", "message_id ID-…", line) for line in lines]
    return [re.sub(r"^\d\d:\d\d:\d\d ", "TIME ", line) for line in lines]


@pytest.fixture
def folder(tmp_path: Path, receiver: KoalaReceiver) -> Callable[..., dict[str, str]]:
    """A folder with ``yourapp.py``; gives the environment a command runs in there."""
    (tmp_path / "yourapp.py").write_text(textwrap.dedent(YOURAPP), encoding="utf-8")

    def env(**extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
            "YOURAPP_KOALA_URL": receiver.url,
            **extra,
        }

    return env


def test_flask_koala_identify_prints_what_docs_cli_shows(
    folder: Callable[..., dict[str, str]], tmp_path: Path, receiver: KoalaReceiver
) -> None:
    command, printed = shown(session("docs/cli.md", "flask --app yourapp koala identify"))

    result = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=folder(), capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr
    assert steady(result.stdout.rstrip("\n").split("\n")) == steady(printed)
    assert len(receiver.bodies) == 1


def test_python_m_flask_koala_testing_prints_what_docs_cli_shows(
    folder: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    command, printed = shown(session("docs/cli.md", "python -m flask_koala.testing"))
    process = subprocess.Popen(
        ["bash", "-c", f"exec {command} --port 0"],  # any free port: 8787 may be taken
        cwd=tmp_path,
        env=folder(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    try:
        lines = [process.stdout.readline().rstrip("\n") for _ in range(2)]
        url = re.search(r"(http://\S+)", lines[0])
        assert url is not None, lines
        post_identify(url.group(1), key="pk_example")
        lines += [process.stdout.readline().rstrip("\n") for _ in range(3)]
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = communicate(process, timeout=10)
    lines += rest.rstrip("\n").split("\n")

    assert steady(lines) == steady(printed)


def test_the_celery_worker_command_delivers_what_the_app_publishes(
    folder: Callable[..., dict[str, str]],
    tmp_path: Path,
    receiver: KoalaReceiver,
    redis_url: str,
) -> None:
    command, _ = shown(session("docs/celery.md", "celery -A yourapp.celery_app worker"))
    client = redis_client(redis_url)
    client.flushdb()
    client.close()
    worker = subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        cwd=tmp_path,
        env=folder(YOURAPP_BROKER=redis_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    app = Flask(__name__)
    app.config.update(
        KOALA_PUBLIC_KEY="pk_example", KOALA_API_URL=receiver.url, KOALA_DISPATCHER="celery"
    )
    from celery import Celery

    koala = Koala(app, celery=Celery("web", broker=redis_url))
    try:
        with app.app_context():
            assert koala.identify("jane@example.com", profile_id=PROFILE_ID)
            assert koala.flush(10)
        assert wait_until(lambda: len(receiver.bodies) == 1, 60)
    finally:
        with app.app_context():
            koala.shutdown(5)
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    assert receiver.bodies[0]["email"] == "jane@example.com"
