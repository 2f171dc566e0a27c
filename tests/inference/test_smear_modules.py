"""The smear-analysis modules import one way: no cycle among them, nothing private
imported across modules, and the shared names (labels, proportions) at the bottom."""

from __future__ import annotations

import ast
from pathlib import Path

import leukoscope

SRC = Path(leukoscope.__file__).parent
MODULES = ["labels", "proportions", "inference.differential", "inference.quality", "inference.tiling",
           "inference.smear_result", "inference.drawing", "inference.smear_output", "inference.smear",
           "service.analysis"]


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported leukoscope module, names taken from it) for every import in ``module``, lazy ones too."""
    tree = ast.parse((SRC / (module.replace(".", "/") + ".py")).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leukoscope."):
            found.append((node.module.removeprefix("leukoscope."), [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("leukoscope."), []) for a in node.names if a.name.startswith("leukoscope.")]
    return found


def test_smear_modules_import_one_way_and_nothing_private() -> None:
    graph = {module: {target for target, _ in _imports(module) if target in MODULES} for module in MODULES}
    for module in MODULES:
        private = [f"{target}.{name}" for target, names in _imports(module) for name in names if name.startswith("_")]
        assert not private, f"{module} imports private names {private}"
    assert graph["labels"] == set() and graph["proportions"] == set()
    # no cycle: repeatedly remove modules that import nothing left in the graph
    remaining = dict(graph)
    while remaining:
        leaves = [m for m, targets in remaining.items() if not targets & remaining.keys()]
        assert leaves, f"import cycle among {sorted(remaining)}"
        for leaf in leaves:
            del remaining[leaf]
