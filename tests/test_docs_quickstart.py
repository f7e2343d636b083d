"""The quickstart of README.md and docs/quickstart.md works as pasted into a new project.

Its files are written to an empty folder; the receiver, ``flask run`` and ``curl`` run as the
page says (on free ports instead of 8787 and 5000), and the receiver prints the call the page
shows. The testing example passes under pytest in the same folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from .support import ROOT, Child, free_port

PAGES = [ROOT / "README.md", ROOT / "docs" / "quickstart.md"]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)


def page_blocks(page: Path) -> list[tuple[str, str]]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


def files(page: Path) -> dict[str, str]:
    """The ``python`` blocks that start with ``# <name>.py``: the files of the project."""
    found = {}
    for lang, body in page_blocks(page):
        match = re.match(r"# (\w+\.py)\n", body)
        if lang == "python" and match:
            found[match.group(1)] = body
    return found


def commands(page: Path) -> list[str]:
    return [
        line[2:]
        for lang, body in page_blocks(page)
        if lang == "console"
        for line in body.splitlines()
        if line.startswith("$ ")
    ]


def shown_output(page: Path) -> list[str]:
    (body,) = [b for lang, b in page_blocks(page) if lang == "text" and "Koala receiver" in b]
    return body.splitlines()


def new_project_env() -> dict[str, str]:
    """This environment without the settings a new project would not have."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("KOALA_", "FLASK_"))}


def test_readme_and_docs_show_the_same_quickstart() -> None:
    readme, docs = PAGES
    assert files(readme) == files(docs)
    assert set(files(readme)) == {"app.py", "conftest.py", "test_app.py"}
    assert commands(readme) == commands(docs)
    assert shown_output(readme) == shown_output(docs)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for name, body in files(PAGES[0]).items():
        (tmp_path / name).write_text(body)
    return tmp_path


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("curl") is None, reason="the quickstart logs in with curl (apt-get install curl)"
)
def test_quickstart_call_arrives(project: Path, spawn: Callable[..., Child]) -> None:
    receiver_port, app_port = str(free_port()), str(free_port())
    app_py = project / "app.py"
    app_py.write_text(app_py.read_text().replace("8787", receiver_port))
    receiver_cmd, flask_cmd, curl_cmd = commands(PAGES[0])
    assert receiver_cmd == "python -m flask_koala.testing"
    assert flask_cmd == "flask --app app run"

    env = new_project_env()
    receiver = spawn(
        [sys.executable, "-m", "flask_koala.testing", "--port", receiver_port], cwd=project, env=env
    )
    app = spawn(
        [sys.executable, "-m", *flask_cmd.split(), "--port", app_port], cwd=project, env=env
    )
    assert receiver.wait_for("Ctrl-C stops"), receiver.seen
    assert app.wait_for(r"Running on http://127\.0\.0\.1"), app.seen

    curl = curl_cmd.replace(":5000/", f":{app_port}/").split()
    done = subprocess.run(curl, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr

    assert receiver.wait_for("identify traits"), receiver.seen
    expected = [line.replace("8787", receiver_port) for line in shown_output(PAGES[0])]
    got = [re.sub(r"^\d\d:\d\d:\d\d ", "12:47:06 ", line) for line in receiver.seen]
    assert got == expected


@pytest.mark.slow
def test_quickstart_testing_example_passes(project: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=project,
        env=new_project_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
