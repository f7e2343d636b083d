"""The shape of the package (issue 12): a small public surface and rooms without cycles.

Read from the source with ``ast``, as a reviewer would read it; one subprocess checks what
``import flask_koala`` loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import flask_koala

PACKAGE = Path(flask_koala.__file__).resolve().parent
MODULES = {
    (p.stem if p.stem != "__init__" else ""): ast.parse(p.read_text(encoding="utf-8"))
    for p in sorted(PACKAGE.glob("*.py"))
}
PUBLIC_MODULES = {"", "signals", "testing", "celery"}


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module within the package, imported names) for every relative import, at any depth,
    except those under ``if TYPE_CHECKING:``."""
    skipped = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for statement in branch.body
        for node in ast.walk(statement)
    }
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in skipped:
            names = [alias.name for alias in node.names]
            if node.module is None:  # from . import a, b
                found.extend((name, []) for name in names)
            else:
                found.append((node.module, names))
    return found


def test_public_modules_are_the_four_the_docs_name() -> None:
    public = {name for name in MODULES if not name.startswith("_")}
    assert public == PUBLIC_MODULES


def test_the_import_graph_has_no_cycle() -> None:
    graph = {name: {target for target, _ in _imports(tree)} for name, tree in MODULES.items()}

    def visit(node: str, path: list[str]) -> None:
        for target in graph.get(node, ()):
            assert target not in path, " -> ".join([*path, target])
            visit(target, [*path, target])

    for name in graph:
        visit(name, [name])


def test_nothing_inside_imports_the_package_root() -> None:
    for name, tree in MODULES.items():
        if name:
            assert "" not in {target for target, _ in _imports(tree)}, name
            assert not any(
                isinstance(node, ast.ImportFrom) and node.module == "flask_koala"
                for node in ast.walk(tree)
            ), name


def test_no_module_imports_another_modules_private_names() -> None:
    for name, tree in MODULES.items():
        for target, names in _imports(tree):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{name or '__init__'} imports {private} from {target}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_room_is_too_big(name: str) -> None:
    source = (PACKAGE / f"{name or '__init__'}.py").read_text(encoding="utf-8")
    assert source.count("\n") <= 500


def test_koala_is_public_api_and_glue_only() -> None:
    (koala,) = (
        node
        for node in MODULES["_extension"].body
        if isinstance(node, ast.ClassDef) and node.name == "Koala"
    )
    assert koala.end_lineno is not None
    assert koala.end_lineno - koala.lineno + 1 <= 250


def test_all_of_the_root_is_sorted_and_exported() -> None:
    assert flask_koala.__all__ == sorted(flask_koala.__all__)
    for name in flask_koala.__all__:
        assert hasattr(flask_koala, name)


def test_import_loads_no_test_server_celery_or_broker() -> None:
    code = (
        "import sys, flask; before = set(sys.modules); import flask_koala; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    loaded = set(subprocess.check_output([sys.executable, "-c", code], text=True).split())
    unwanted = {"flask_koala._receiver", "flask_koala.testing", "celery", "kombu", "redis"}
    assert not loaded & unwanted
    assert not any(name.startswith(("celery.", "kombu.", "redis.")) for name in loaded)


def test_a_celery_worker_module_loads_no_flask() -> None:
    code = (
        "import sys; import flask_koala.celery; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('flask', 'flask_login', 'click', 'werkzeug', 'jinja2'))))"
    )
    assert subprocess.check_output([sys.executable, "-c", code], text=True).split() == []
