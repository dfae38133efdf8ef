"""The package's imports run one way (docs/layout.md): no module imports, at the top or inside a
function, a module that imports it back, and every module imports alone in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lsg"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The package modules a file imports anywhere (module level or inside functions); `from
    lsg.x import y` counts as `lsg.x.y` when that is a module, else `lsg.x`."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("lsg"):
            for a in node.names:
                out.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module)
    return out & known


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {m: imported(p, set(mods)) for m, p in mods.items()}
    for m in graph:  # a package's __init__ is what `from lsg.x import ...` runs first: not an edge back
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".") and d != m}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["lsg.context"] = graph["lsg.context"] | {"lsg.specs"}  # context -> specs -> ... -> context
    assert find_cycle(graph) is not None


def test_the_layers_run_one_way():
    """The layering of issue 18 (docs/layout.md): a module never imports one of a later layer."""
    layers = [["lsg.files", "lsg.runs", "lsg.configs", "lsg.sinks", "lsg.segments", "lsg.context"], ["lsg.gates"],
              ["lsg.attention"], ["lsg.families"], ["lsg.backbones"], ["lsg.attach"], ["lsg.scoring"], ["lsg.prefix"],
              ["lsg.answers", "lsg.training", "lsg.evaluation"], ["lsg.specs"],
              ["lsg.comparison", "lsg.stacking", "lsg.oracle", "lsg.benchmarks", "lsg.analysis"], ["lsg.cli"]]
    rank = {}
    for i, names in enumerate(layers):
        for n in names:
            rank[n] = i

    def layer_of(m: str) -> int | None:
        parts = m.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in rank:
                return rank[".".join(parts[:k])]
        return None

    upward = [(m, d) for m, deps in import_graph().items() for d in deps
              if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)]
    assert upward == []


@pytest.mark.slow
@pytest.mark.parametrize("group", ["lsg.context", "lsg.attach", "lsg.prefix", "lsg.specs", "lsg.comparison",
                                   "lsg.benchmarks.run", "lsg.cli.train", "lsg.cli.summarize"])
def test_a_module_imports_alone_in_a_fresh_interpreter(group):
    result = subprocess.run([sys.executable, "-c", f"import {group}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_test_module_imports_another():
    """Helpers live in tests/hand.py, conftest fixtures or helper modules (not `test_*.py`), so a
    test module runs alone and never runs another's tests by import."""
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name} imports {n}" for n in names if n.split(".")[-1].startswith("test_")]
    assert not offenders, offenders
