"""Release-ready: the licence, the documented install command, and which package is tested.

``.ci/run-wheel`` runs the suite against the built wheel with ``KOALA_EXPECT_PACKAGE_IN`` set
to the venv's site-packages; this file then checks that the wheel, not the source tree, is
what every other test imported.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import flask_koala

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = os.environ.get("KOALA_EXPECT_PACKAGE_IN")
PAGES = [ROOT / "README.md", ROOT / "docs/quickstart.md"]


def install_commands() -> list[str]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        found += re.findall(r"^```bash\n(pip install [^\n]*)\n```$", text, re.M)
    return found


def test_license_is_the_mit_licence_setup_cfg_names() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")

    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 flask-koala contributors" in text
    assert setup["metadata"]["license"] == "MIT"


def test_the_package_under_test_is_the_one_expected() -> None:
    where = Path(flask_koala.__file__).resolve()
    if EXPECTED:
        assert where.is_relative_to(Path(EXPECTED).resolve()), where
        assert not (ROOT / "flask_koala").exists()
    else:
        assert where.parent == ROOT / "flask_koala"


def test_the_docs_show_one_install_command() -> None:
    assert install_commands() == ["pip install -e ."] * len(PAGES)


@pytest.mark.slow
@pytest.mark.skipif(bool(EXPECTED), reason="the wheel run tests the wheel, not a source install")
def test_documented_install_command_installs_from_a_clone() -> None:
    # The command as the docs show it, as far as it can go without the network: resolve
    # and build the editable install of this clone, without installing it.
    command = install_commands()[0].split()
    assert command[:2] == ["pip", "install"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            *command[:2],
            "--dry-run",
            "--no-deps",
            "--no-build-isolation",
            *command[2:],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Would install flask-koala" in done.stdout


def _versions(lines: str, operator: str) -> dict[str, str]:
    """``name: version`` of each ``name<operator>version`` line, trailing ``.0`` dropped."""
    found = {}
    for line in lines.splitlines():
        line = line.split("#", 1)[0].strip()
        if operator in line:
            name, _, version = line.partition(operator)
            found[name.strip().lower()] = re.sub(r"(\.0)+$", "", version.strip())
    return found


def test_make_test_min_pins_every_lowest_version_setup_cfg_claims() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    claimed = config["options"]["install_requires"] + config["options.extras_require"]["celery"]
    floors = _versions(claimed, ">=")
    pins = _versions((ROOT / "constraints-min.txt").read_text(encoding="utf-8"), "==")
    assert {name: pins.get(name) for name in floors} == floors


def test_the_source_distribution_holds_what_its_tests_need(tmp_path: Path) -> None:
    # setuptools adds tests/test_*.py to an sdist by itself, but not what they import.
    build = (
        "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    name = result.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        members = {m.split("/", 1)[1] for m in sdist.getnames() if "/" in m}
    needed = {
        "tests/__init__.py",
        "tests/conftest.py",
        "tests/support.py",
        "tests/http_parts.py",
        "docs/index.md",
        "examples/password_login.py",
        "CHANGES.md",
        "Makefile",
    }
    assert needed - members == set()
    assert not [m for m in members if m.startswith("docs/_build") or "__pycache__" in m]
