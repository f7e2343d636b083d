"""The README is the front door: every code block in it runs, or names what covers it.

Each fenced block is preceded by a marker comment:

- ``<!-- run -->``: the test runs it (Python in a fresh interpreter, shell with bash);
- ``<!-- covered: PATH -->``: an example, test or script at PATH runs the same thing;
- ``<!-- illustration -->``: a diagram or a sample of output, not something to run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(
    r"(?:<!-- (?P<marker>[^>]*?) -->\n)?```(?P<lang>[^\n]*)\n(?P<code>.*?)^```$", re.S | re.M
)
CONFIG_KEY = re.compile(r'"(KOALA_[A-Z_]+)"')

BLOCKS = [
    (m.group("marker") or "", m.group("lang"), m.group("code"), README[: m.start()].count("\n") + 1)
    for m in FENCE.finditer(README)
]


def test_every_block_has_a_marker() -> None:
    unmarked = [line for marker, _, _, line in BLOCKS if not marker]
    assert unmarked == [], f"README blocks without a marker at lines {unmarked}"


@pytest.mark.parametrize(
    ("path", "line"),
    [
        (marker.split(":", 1)[1].strip(), line)
        for marker, _, _, line in BLOCKS
        if marker.startswith("covered:")
    ],
)
def test_covered_blocks_name_existing_files(path: str, line: int) -> None:
    assert (ROOT / path).exists(), f"README line {line} names a missing {path}"


RUNNABLE = [(lang, code, line) for marker, lang, code, line in BLOCKS if marker == "run"]


@pytest.mark.parametrize(("lang", "code", "line"), RUNNABLE, ids=[f"line{r[2]}" for r in RUNNABLE])
def test_runnable_blocks_run(lang: str, code: str, line: int, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if lang == "python":
        command = [sys.executable, "-c", code]
    elif lang in ("bash", "sh"):
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        pytest.fail(f"README line {line}: cannot run a {lang!r} block")
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"README line {line}:\n{result.stderr}"


def test_every_config_key_is_documented() -> None:
    source = (ROOT / "flask_koala" / "_config.py").read_text()
    keys = set(CONFIG_KEY.findall(source))
    # A key added in this release may still be documented in its docs/incoming page.
    incoming = "".join(p.read_text() for p in (ROOT / "docs" / "incoming").glob("*.md"))
    missing = sorted(k for k in keys if f"| `{k}` |" not in README + incoming)
    assert missing == []


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(
    ("target", "runs"),
    [("demo", "-m examples.demo"), ("test", "-m pytest"), ("bench", "-m benchmarks.run")],
)
def test_make_targets_run_what_the_readme_says(target: str, runs: str) -> None:
    # `make -n` prints what the target would run; the demo and the suite are then run for
    # real by tests/test_demo.py and by .ci/run.
    assert f"make {target}" in README
    result = subprocess.run(
        ["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert runs in result.stdout
