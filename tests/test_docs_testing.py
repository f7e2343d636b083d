"""docs/testing.md ("Testing your app") and docs/cli.md ("The CLI") run as shown.

Its files run as a user's project, and its CLI output is what the CLI prints.

A ``python`` block whose first line is ``# <name>.py`` is that file of the user's project;
``yourapp`` is played by ``examples/factory_app``, without the public key its defaults set,
so a recipe that lets calls go out must set ``KOALA_PUBLIC_KEY`` itself, as a user's must.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from examples.factory_app import create_app
from flask_koala import __version__

from .support import doc_section

ROOT = Path(__file__).resolve().parent.parent
DOC = doc_section("Testing your app", "The CLI")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


YOURAPP = """
from examples.factory_app import create_app as create_example_app


def create_app(config=None):
    return create_example_app({"KOALA_PUBLIC_KEY": None, **(config or {})})
"""


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(DOC) if lang == language]


def project_files() -> dict[str, str]:
    files = {}
    for body in blocks("python"):
        match = re.match(r"# (\w+)\.py\n", body)
        if match:
            files[match.group(1)] = body
    return files


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(yourapp=YOURAPP)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(**project_files())
    return pytester


def test_docs_hold_the_project_files() -> None:
    assert set(project_files()) == {"conftest", "test_login", "test_delivery", "check_delivery"}


@pytest.mark.slow
def test_documented_tests_pass(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)

    result.assert_outcomes(passed=4)


@pytest.mark.slow
def test_documented_script_runs(project: pytest.Pytester) -> None:
    done = subprocess.run(
        [sys.executable, "check_delivery.py"],
        cwd=project.path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr


def test_documented_check_output_is_real() -> None:
    (shown,) = [b for b in blocks("console") if b.startswith("$ flask --app yourapp koala check")]
    expected = shown.split("\n", 1)[1].replace("0.2.0.dev0", __version__)

    result = create_app().test_cli_runner().invoke(args=["koala", "check"])

    assert result.output == expected
