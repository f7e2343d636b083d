"""Every code block in the README and the docs runs, or names a test that exercises it.

Each fenced block (MyST directives such as ``{toctree}`` aside) is preceded by a marker:

- ``<!-- run -->``: this test runs it (Python in a fresh interpreter, shell with bash);
- ``<!-- executed-by: tests/test_x.py -->``: that test reads this page (it names the page's
  path, or the page's title) and runs the block itself;
- ``<!-- covered: PATH -->``: every line of the block's code appears in PATH (comments,
  docstrings and blank lines aside; for a console block, its ``$`` commands), in a Python
  PATH in its code, not in a docstring or comment, and PATH is a test, a file a test names
  (by path or module), or the CI script;
- ``<!-- illustration -->``: a diagram or a sample of output, not something to run (no
  ``$`` command in it).
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:<!-- (?P<marker>[^>]*?) -->\n)?```(?P<lang>[^\n]*)\n(?P<code>.*?)^```$", re.S | re.M
)
TESTS = sorted((ROOT / "tests").glob("test_*.py")) + sorted(
    (ROOT / "examples").glob("**/tests/test_*.py")
)


class Block(NamedTuple):
    page: Path
    line: int
    marker: str
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group("lang").startswith("{"):
                continue  # a MyST directive (toctree, eval-rst, include), not code
            line = text[: m.start()].count("\n") + 1
            found.append(
                Block(page, line, m.group("marker") or "", m.group("lang"), m.group("code"))
            )
    return found


BLOCKS = blocks()


def ids(selected: list[Block]) -> list[str]:
    return [b.where for b in selected]


def title(page: Path) -> str:
    first = page.read_text(encoding="utf-8").split("\n", 1)[0]
    return first.lstrip("# ").strip()


def significant_lines(block: Block) -> list[str]:
    """The lines of code a covering file must hold: no blanks, comments, docstrings, output
    or ``...``."""
    code = block.code
    if block.lang == "python":
        with contextlib.suppress(SyntaxError):  # a fragment that does not parse alone
            code = code_only(textwrap.dedent(code))
    lines = []
    for raw in code.splitlines():
        line = raw.strip()
        if block.lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if block.lang in ("python", "bash", "sh", "console"):
            line = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            if line.startswith("#"):
                continue
        if line and line != "...":
            lines.append(" ".join(line.split()))
    return lines


def normalized(path: Path) -> str:
    """The file's lines, whitespace collapsed; for Python, its code alone: a line that only
    a docstring or a comment mentions is not exercised by anything."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        text = code_only(text)
    return "\n".join(" ".join(line.split()) for line in text.splitlines())


def code_only(source: str) -> str:
    """``source`` with its comments and docstrings blanked out."""
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            lines[row - 1] = lines[row - 1][:col]
    for node in ast.walk(ast.parse(source)):
        docstring = _docstring(node)
        if docstring is not None:
            for row in range(docstring.lineno, (docstring.end_lineno or docstring.lineno) + 1):
                lines[row - 1] = ""
    return "\n".join(lines)


def _docstring(node: ast.AST) -> Optional[ast.Expr]:
    scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    first = node.body[0] if isinstance(node, scopes) and node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        return first if isinstance(first.value.value, str) else None
    return None


def named_by_a_test(path: str) -> bool:
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    parent, _, leaf = module.rpartition(".")
    folder = '" / "'.join(Path(path).parent.parts)  # a test's ROOT / "examples" / "templates"
    needles = [path, module, f"from {parent} import {leaf}", folder if "." in path else path]
    # A file inside a package a test runs as a whole (pytest examples/factory_app).
    needles += [str(p) for p in Path(path).parents if len(p.parts) >= 2]
    return any(any(n in t.read_text(encoding="utf-8") for n in needles) for t in TESTS)


def test_every_block_has_a_marker() -> None:
    unmarked = [b.where for b in BLOCKS if not b.marker]
    assert unmarked == [], f"blocks without a marker: {unmarked}"


def test_markers_are_known() -> None:
    known = ("run", "illustration", "covered:", "executed-by:")
    unknown = [b.where for b in BLOCKS if b.marker and not b.marker.startswith(known)]
    assert unknown == []


def test_an_illustration_holds_no_command_to_type() -> None:
    # A "$ ..." line is something a reader runs: it is run, or a test runs it.
    commands = [
        b.where
        for b in BLOCKS
        if b.marker == "illustration" and any(line.startswith("$ ") for line in b.code.split("\n"))
    ]
    assert commands == [], f"illustrations with a command in them: {commands}"


COVERED = [b for b in BLOCKS if b.marker.startswith("covered:")]


@pytest.mark.parametrize("block", COVERED, ids=ids(COVERED))
def test_covered_blocks_appear_in_a_tested_file(block: Block) -> None:
    path = block.marker.split(":", 1)[1].strip()
    target = ROOT / path
    assert target.is_file(), f"{block.where} names a missing {path}"
    lines = significant_lines(block)
    assert lines, f"{block.where}: nothing to check; an output sample is an illustration"
    text = normalized(target)
    missing = [line for line in lines if line not in text]
    assert missing == [], f"{block.where}: {path} does not hold these lines"
    is_test = target.name.startswith("test_") and target.suffix == ".py"
    assert is_test or path == ".ci/run" or named_by_a_test(path), (
        f"{block.where}: no test runs {path}"
    )


EXECUTED = [b for b in BLOCKS if b.marker.startswith("executed-by:")]


@pytest.mark.parametrize("block", EXECUTED, ids=ids(EXECUTED))
def test_executed_blocks_name_a_test_that_reads_the_page(block: Block) -> None:
    path = block.marker.split(":", 1)[1].strip()
    test = ROOT / path
    assert test.is_file(), f"{block.where} names a missing {path}"
    assert test.name.startswith("test_"), f"{block.where}: {path} is not a test"
    source = test.read_text(encoding="utf-8")
    page = str(block.page.relative_to(ROOT))
    assert page in source or f'"{title(block.page)}"' in source, (
        f"{block.where}: {path} never reads {page}"
    )


RUNNABLE = [b for b in BLOCKS if b.marker == "run"]


@pytest.mark.parametrize("block", RUNNABLE, ids=ids(RUNNABLE))
def test_runnable_blocks_run(block: Block, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if block.lang == "python":
        command = [sys.executable, "-c", block.code]
    elif block.lang in ("bash", "sh"):
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    else:
        pytest.fail(f"{block.where}: cannot run a {block.lang!r} block")
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"{block.where}:\n{result.stderr}"


def test_readme_is_at_most_12_kb() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024


def test_every_docs_page_is_in_the_toctree() -> None:
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")} - {"index"}
    listed = set(re.findall(r"^([a-z-]+)$", index, re.M))
    assert pages - listed == set()


@pytest.mark.skipif(
    shutil.which("make") is None, reason="make is not installed (apt-get install make)"
)
@pytest.mark.parametrize(
    ("command", "runs", "page"),
    [
        ("make demo", "-m examples.demo", "README.md"),
        ("make demo", "-m examples.demo", "docs/quickstart.md"),
        ("make test", "-m pytest", "README.md"),
        ("make bench", "-m benchmarks.run", "docs/performance.md"),
        ("make docs", "-m sphinx -W --keep-going", "README.md"),
    ],
)
def test_make_targets_run_what_the_docs_say(command: str, runs: str, page: str) -> None:
    # `make -n` prints what the target would run; the demo, the suite and the benchmark are
    # then run for real by tests/test_demo.py, .ci/run and tests/test_benchmarks.py.
    assert command in (ROOT / page).read_text(encoding="utf-8")
    result = subprocess.run(
        [*command.split(), "-n", "-B"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert runs in result.stdout


def test_a_line_only_a_docstring_or_a_comment_holds_covers_nothing(tmp_path: Path) -> None:
    target = tmp_path / "test_x.py"
    target.write_text('"""make demo"""\n\n\ndef test() -> None:\n    pass  # make demo\n')
    assert "make demo" not in normalized(target)


LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_to_pages_lead_somewhere(page: Path) -> None:
    targets = LINK.findall(page.read_text(encoding="utf-8"))
    missing = [t for t in targets if not (page.parent / t).resolve().is_file()]
    assert missing == []


@pytest.mark.parametrize(
    "module", ["flask_koala", "flask_koala.signals", "flask_koala.testing", "flask_koala.celery"]
)
def test_api_page_documents_every_public_name(module: str) -> None:
    imported = __import__(module, fromlist=["__all__"])
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    names = [n for n in imported.__all__ if n not in ("signals", "__version__")]
    assert [n for n in names if n not in api] == []
