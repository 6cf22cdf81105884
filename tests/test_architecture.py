"""The package's shape, enforced (issue #24, docs/architecture.md).

Walks the import statements of every module under ``src/quantcal`` (module level, inside
functions and lazy imports alike; only ``if TYPE_CHECKING:`` blocks are left out, as they never
run) and checks three rules:

1. **No import cycles**: the graph of "module A imports module B" has no strongly connected
   component of more than one module (and no module imports itself). Importing a package's
   attribute counts as importing the submodule of that name when one exists, and importing
   ``quantcal.a.b`` counts as importing the package ``quantcal.a`` too (its ``__init__`` runs
   first). A package that re-exports lazily (``__getattr__`` with ``importlib``, as
   ``quantcal`` and ``quantcal.study`` do) imports nothing until an attribute is read.
2. **No private imports across modules**: no module imports a name that starts with ``_`` from
   another module (``from quantcal.x import _helper``), and a private module (``_sequential``)
   is imported only from inside its own package.
3. **Small modules**: no module is longer than ``MAX_LINES`` lines.

The graph is built from the source text, never by importing, so the test is fast and sees lazy
imports as well.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "quantcal"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that can run: everything but ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import reads from."""
    if not node.level:
        return node.module or ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(module imported, attribute imported or None, line) for each import of the package."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    out.append((alias.name, None, node.lineno))
            continue
        base = _resolve(name, path, node)
        if base.split(".")[0] != PACKAGE:
            continue
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in known:  # `from quantcal import metrics` imports the module quantcal.metrics
                out.append((sub, None, node.lineno))
            else:
                out.append((base, alias.name, node.lineno))
    return out


def _with_packages(name: str, target: str, known: dict[str, Path]) -> set[str]:
    """``target`` and the packages Python initialises to import it (``quantcal.a.b`` runs
    ``quantcal/a/__init__.py`` first), leaving out the importer's own packages."""
    parts = target.split(".")
    out = {".".join(parts[:i]) for i in range(2, len(parts))} | {target}
    return {m for m in out if m in known and not (name == m or name.startswith(m + "."))}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: set().union(
            *(
                _with_packages(name, t, known)
                for t, _, _ in imports(name, path, known)
                if t in known
            )
        )
        for name, path in known.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, and self-imports (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def private_imports() -> list[str]:
    known = modules()
    bad = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target, attr, line in imports(name, path, known):
            where = f"{path.relative_to(SRC)}:{line}"
            private = attr is not None and attr.startswith("_") and not attr.startswith("__")
            if private and target != name:
                bad.append(f"{where} imports the private name {target}.{attr}")
            parts = target.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if not (package == owner or package.startswith(owner + ".")):
                        bad.append(
                            f"{where} imports the private module {target} from outside {owner}"
                        )
                    break
    return bad


def test_the_graph_walker_sees_lazy_imports_and_resolves_relative_ones(tmp_path):
    pkg = tmp_path / "quantcal"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from quantcal import b\n"
        "def f():\n    from .sub import c\n    from quantcal.b import _x\n"
    )
    (pkg / "b.py").write_text("import quantcal.a\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\n")
    global SRC
    saved = SRC
    SRC = tmp_path
    try:
        known = modules()
        assert set(known) == {
            "quantcal",
            "quantcal.a",
            "quantcal.b",
            "quantcal.sub",
            "quantcal.sub.c",
        }
        found = imports("quantcal.a", known["quantcal.a"], known)
        assert ("quantcal.sub.c", None, 5) in found and ("quantcal.b", "_x", 6) in found
        assert not any(
            t == "quantcal.b" and a is None for t, a, _ in found
        )  # TYPE_CHECKING left out
        assert imports("quantcal.sub", known["quantcal.sub"], known) == [
            ("quantcal.sub.c", None, 1)
        ]
        edges = graph()
        # a imports sub.c, so sub (its package) too
        assert cycles(edges) == [["quantcal.a", "quantcal.b", "quantcal.sub", "quantcal.sub.c"]]
        assert private_imports() == ["quantcal/a.py:6 imports the private name quantcal.b._x"]
    finally:
        SRC = saved


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, (
        "import cycles (break each by moving the shared code down a layer):\n"
        + "\n".join(" <-> ".join(c) for c in found)
    )


def test_no_private_imports_across_modules():
    bad = private_imports()
    assert not bad, (
        "private names imported across modules (make them public or move them):\n" + "\n".join(bad)
    )


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_small(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it by job"
