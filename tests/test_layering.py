"""The package's import graph: no cycle, and each layer imports only the layers below it.

models, weights, data, text and scenes at the bottom; ``training`` pieces above them; ``build`` (config ->
objects) above those; ``evaluation`` works on predict functions and imports neither ``training`` nor ``build``;
the trainer, ``evaluate`` and the entry points on top. Read from the source (every ``import`` statement, at any
depth), so a function-local import cannot hide an edge.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vpd_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the vpd_jax modules it imports (``from vpd_jax.x import y`` counts ``vpd_jax.x.y`` when that is
    a module, else ``vpd_jax.x``)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("vpd_jax")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vpd_jax"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    edges.add(sub if sub in modules else node.module)
        graph[name] = {e for e in edges if e in modules and e != name and e != "vpd_jax"}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_is_read():
    graph = import_graph()
    assert "vpd_jax.training.trainer" in graph and "vpd_jax.build" in graph["vpd_jax.training.trainer"]
    assert "vpd_jax.evaluation.evaluator" in graph["vpd_jax.training.trainer"]


def test_no_import_cycle():
    graph = import_graph()
    for name in graph:
        assert name not in _reachable(graph, name), f"{name} imports itself through {sorted(graph[name])}"


def _layer_imports(prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    graph = import_graph()
    return {n: _reachable(graph, n) for n in graph if n.startswith(prefixes)}


def test_evaluation_imports_no_training():
    for name, deps in _layer_imports(("vpd_jax.evaluation",)).items():
        bad = sorted(d for d in deps if d.startswith(("vpd_jax.training", "vpd_jax.build", "vpd_jax.evaluate")))
        assert not bad, f"{name} imports {bad}"


def test_models_weights_and_data_sit_at_the_bottom():
    upper = ("vpd_jax.training", "vpd_jax.build", "vpd_jax.evaluation", "vpd_jax.evaluate", "vpd_jax.inference",
             "vpd_jax.cli", "vpd_jax.tools")
    for name, deps in _layer_imports(("vpd_jax.models", "vpd_jax.weights", "vpd_jax.data")).items():
        bad = sorted(d for d in deps if d.startswith(upper))
        assert not bad, f"{name} imports {bad}"
