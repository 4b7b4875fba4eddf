"""The package's modules import each other without cycles (documents/design/architecture.md).

Every import counts: module level or inside a function, ``import x`` or
``from . import x``; the package ``__init__`` is a node like any module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import atlasmtl

PACKAGE = "atlasmtl"
ROOT = Path(atlasmtl.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (anywhere in its source)."""
    paths = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                # ``from pkg import name``: name is a submodule when one exists, else an attribute of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # ``import atlasmtl.x.y`` → the deepest module that exists
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_imports_inside_functions_and_the_package_init():
    graph = import_graph()
    assert "atlasmtl.result" in graph["atlasmtl"]  # the package __init__ is a node
    assert "atlasmtl.report_html" in graph["atlasmtl.result"]  # imported inside PredictionResult.report
    assert "atlasmtl.model" in graph["atlasmtl.report_html"]  # imported inside render_report


def test_package_modules_import_each_other_without_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_no_module_imports_the_package_version_from_init():
    """The version lives in atlasmtl/_version.py; ``from . import __version__`` would point back at __init__."""
    for path in ROOT.rglob("*.py"):
        if path.name != "__init__.py":
            assert "from . import __version__" not in path.read_text(), path.name
