"""``examples/factory_app`` ships its own tests, written against the plugin; they must pass.

They run in their own pytest process, as the example's user would run them: the example's
``conftest.py`` opts into the plugin with ``pytest_plugins``, which pytest only honours in a
conftest that is loaded first, not one met halfway through collecting this suite.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


DOCUMENTED = ".venv/bin/python -m pytest examples/factory_app"


@pytest.mark.slow
def test_factory_app_tests_pass() -> None:
    # The command docs/testing.md shows, run as a user runs it from a clone: no activated
    # venv, no PYTHONPATH; this interpreter stands in for .venv/bin/python.
    command = DOCUMENTED.split()
    assert command[0] == ".venv/bin/python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [sys.executable, *command[1:], "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr  # 5 would mean none collected
    assert re.search(r"^\d+ passed in", done.stdout, re.MULTILINE), done.stdout
