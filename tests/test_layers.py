"""rope_jit's modules call down, never up: the import graph (imports at module level and
inside functions alike, read from the source) has no cycle, and every import goes to a
lower layer of LAYERS. A new module must be placed in a layer here. Modules of a
subpackage are named with their package (``integrations.transformers``)."""

from __future__ import annotations

import ast
from pathlib import Path

import rope_jit

PACKAGE = Path(rope_jit.__file__).parent

# Bottom first. A module may import modules of lower layers only.
LAYERS = [
    ["_version", "dtypes", "tuned"],  # tuned: data only (shipped launch knobs)
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
    ["tune", "warm_fused"],
    ["cli"],
    ["__main__", "__init__"],
    # integrations with other libraries: imported by their users only, never by rope_jit
    ["integrations"],
    ["integrations.transformers"],
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def _known(dotted: str, names: set) -> str:
    """The graph node of a module path relative to the package: a subpackage module by its
    dotted name, a top-level module (or anything inside it) by its first part."""
    return dotted if dotted in names else dotted.split(".")[0]


def import_graph() -> dict:
    paths = {p: _module_name(p) for p in PACKAGE.rglob("*.py")}
    names = set(paths.values())
    graph = {}
    for path, name in paths.items():
        package = path.relative_to(PACKAGE).parts[:-1]  # the importing module's package
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = package[:len(package) - (node.level - 1)]
                if node.module:
                    deps.add(_known(".".join((*base, node.module)), names))
                else:
                    deps.update(_known(".".join((*base, a.name)), names) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rope_jit."):
                deps.add(_known(node.module.split(".", 1)[1], names))
            elif isinstance(node, ast.Import):
                deps.update(_known(a.name.split(".", 1)[1], names) for a in node.names
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
