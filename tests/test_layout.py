"""The code's shape: imports point one way, no cycles, small modules, no script borrows from tests."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "storage", "flows")
MAX_LINES = 350


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(*folders: str) -> dict[str, Path]:
    return {module_name(p): p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """Project modules that ``path`` imports anywhere (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(*folders: str) -> dict[str, set[str]]:
    files = project_files(*folders)
    known = set(files) | {"tests"}
    graph = {}
    for name, path in files.items():
        graph[name] = imported(path, known) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph(*PACKAGES)) == []


def test_storage_imports_nothing_from_pipeline_or_flows() -> None:
    graph = import_graph(*PACKAGES)
    bad = {
        m: sorted(t for t in ts if not t.startswith("storage")) for m, ts in graph.items() if m.startswith("storage")
    }
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_nothing_outside_tests_imports_tests() -> None:
    graph = import_graph(*PACKAGES, "scripts", "benchmarks")
    assert {m: ts for m, ts in graph.items() if "tests" in ts} == {}


def test_components_import_no_stage() -> None:
    """Arrows point one way: stages → components → storage. Only the CLI, the flows and the
    stages themselves import a stage module."""
    graph = import_graph(*PACKAGES)
    top = ("pipeline.stages", "pipeline.cli", "flows", "pipeline.testing")
    bad = {
        m: sorted(t for t in ts if t.startswith("pipeline.stages")) for m, ts in graph.items() if not m.startswith(top)
    }
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_modules_are_small() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in project_files(*PACKAGES).items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
