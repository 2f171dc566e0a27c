"""The shape of the code: imports point one way, and modules keep their private helpers private."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "leukoscope"


def test_the_layer_contract_holds() -> None:
    """pyproject.toml's import-linter contract: cli -> service -> tasks -> engine -> inference ->
    bundle/evaluation -> preprocessing -> models -> classic/data -> base. A cycle between packages
    breaks it too, since it needs an import pointing up."""
    pytest.importorskip("importlinter")
    # In a subprocess: import-linter configures logging and disables every logger already created.
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True, no_logo=True))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _imported_private_names() -> list[str]:
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("leukoscope"):
                found += [f"{path.relative_to(SOURCE)}: {node.module}.{alias.name}"
                          for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_helpers() -> None:
    assert _imported_private_names() == []
