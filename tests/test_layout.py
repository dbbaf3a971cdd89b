"""The project's shape: import direction inside reference/, and one importer of upstream."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports (at any depth: function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found.update(n for n in names if n.split(".")[0] == package)
    return found


def _module_graph(package: str) -> dict[str, set[str]]:
    root = REPO / package
    modules = {f"{package}.{p.stem}": p for p in root.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in _imports(path, package) if m in modules and m != name} for name, path in modules.items()}


def test_reference_has_no_import_cycle():
    graph = _module_graph("reference")
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_profiles_depend_on_nothing_above_them():
    assert _module_graph("reference")["reference.profiles"] <= {"reference.versions"}


def test_only_the_upstream_driver_imports_peft_and_trl():
    importers = sorted(
        str(p.relative_to(REPO))
        for folder in ("reference", "conformance", "strategies")
        for p in (REPO / folder).rglob("*.py")
        if _imports(p, "peft") | _imports(p, "trl")
    )
    assert importers == ["conformance/engine/upstream.py"]
