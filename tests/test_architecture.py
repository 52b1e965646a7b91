"""The package's shape: no import cycles, every module importable on its own, no module too long to read.

The import graph is read from the source (``ast``): every ``import`` of a ``lightning_unlearn`` module, at module
level or inside a function (where a cycle hides until the function runs), except those under ``if TYPE_CHECKING:``
(annotations only; they never execute). A cycle is a module that imports, directly or through others, a module that
imports it back.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_unlearn"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str, path: Path) -> set[str]:
    """The package modules ``module`` imports (not under ``TYPE_CHECKING``)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in MODULES and name != module}


def _graph() -> dict[str, set[str]]:
    return {module: _imported(module, path) for module, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    return components


def test_the_import_graph_is_read_correctly():
    graph = _graph()
    assert "lightning_unlearn.unlearn.base" in graph["lightning_unlearn.unlearn.methods.one_step"]
    assert "lightning_unlearn.cli" in graph["lightning_unlearn.__main__"]
    # a planted cycle is found
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(planted) == [["a", "b", "c"]]


def test_no_module_imports_one_that_imports_it_back():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    """Each module alone, first in a fresh package import (no order of earlier imports can hide a cycle)."""
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    ours = [m for m in sys.modules if m == 'lightning_unlearn' or m.startswith('lightning_unlearn.')]\n"
        "    for loaded in ours:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    modules = [m for m in MODULES if m != "lightning_unlearn.__main__"]
    result = subprocess.run(
        [sys.executable, "-c", script, *modules], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["lightning_unlearn"])
def test_the_public_api_is_one_grouped_namespace(name):
    import importlib

    package = importlib.import_module(name)
    exported = set(package.__all__)
    assert {
        "SharpnessProfiler",
        "UnlearnModule",
        "profile_model",
        "SharpnessProfile",
        "FirstOrder",
        "Validated",
        "evaluate_model",
        "PoisonedDataModule",
        "ClassifierModule",
    } <= exported
    assert all(hasattr(package, attr) for attr in exported)
    private = {n for n in exported if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))}
    assert not private | (exported & {"init_sums", "make_generator", "reduce_diagonal_sums"})
