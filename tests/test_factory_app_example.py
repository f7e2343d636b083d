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


@pytest.mark.slow
def test_factory_app_tests_pass() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/factory_app"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr  # 5 would mean none collected
    assert re.search(r"^\d+ passed in", done.stdout, re.MULTILINE), done.stdout
