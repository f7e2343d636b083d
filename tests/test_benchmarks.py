"""The benchmark runs end to end; its figures are never asserted (tests never time things)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_smoke_run_prints_every_figure() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^([0-5]b?)\. .*(?:PASS|FAIL|n/a)$", result.stdout, re.MULTILINE)
    assert rows == ["0", "1", "1b", "2", "2b", "3", "4", "5"], result.stdout
    assert "load average" in result.stdout  # the run's conditions
