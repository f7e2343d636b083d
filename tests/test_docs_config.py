"""docs/configuration.md has one table row for every KOALA_* key the config code reads."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from flask_koala import _config

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
ROW = re.compile(r"^\| `(KOALA_[A-Z_]+)` \|", re.M)


def keys_in_code() -> set[str]:
    # The module's source, wherever it is installed (the wheel test has no flask_koala/ here).
    return set(re.findall(r'"(KOALA_[A-Z_]+)"', inspect.getsource(_config)))


def rows() -> list[str]:
    return ROW.findall(PAGE.read_text(encoding="utf-8"))


def test_every_key_has_a_row() -> None:
    assert sorted(keys_in_code() - set(rows())) == []


def test_every_row_is_a_real_key() -> None:
    assert sorted(set(rows()) - keys_in_code()) == []


def test_every_key_has_one_row() -> None:
    documented = rows()
    assert sorted({k for k in documented if documented.count(k) > 1}) == []


def test_no_other_page_repeats_a_settings_table() -> None:
    others = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    repeated = [p.name for p in others if p != PAGE and ROW.search(p.read_text(encoding="utf-8"))]
    assert repeated == []
