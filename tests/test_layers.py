"""rope_jit's modules call down, never up: the import graph (imports at module level and
inside functions alike, read from the source) has no cycle, and every import goes to a
lower layer of LAYERS. A new module must be placed in a layer here."""

from __future__ import annotations

import ast
from pathlib import Path

import rope_jit

PACKAGE = Path(rope_jit.__file__).parent

# Bottom first. A module may import modules of lower layers only.
LAYERS = [
    ["_version", "dtypes"],
    ["_cuda", "reference"],
    ["arrays", "specs"],
    ["call", "jit", "positions", "specs_fused"],
    ["scaling", "call_fused"],
    ["plan", "cos_sin_cache"],
    ["tuning", "plan_fused"],
    ["launch"],
    ["launch_fused"],
    ["torch_ops"],
    ["torch_ops_fused"],
    ["route"],
    ["api_fused"],
    ["api"],
    ["rotary_embedding", "warm"],
    ["tune"],
    ["cli"],
    ["__main__", "__init__"],
]


def import_graph() -> dict:
    graph = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rope_jit."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names
                            if a.name.startswith("rope_jit."))
        graph[name] = deps - {name}
    return graph


def test_every_module_has_a_layer():
    placed = {m for layer in LAYERS for m in layer}
    assert set(import_graph()) == placed


def test_imports_go_down_only():
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    graph = import_graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if d in rank and rank[d] >= rank[m])
    assert not upward, f"imports that do not go down: {upward}"


def test_no_import_cycle():
    graph = import_graph()
    state: dict = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path + [m, d])}")
            if d not in state:
                visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
