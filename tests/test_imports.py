"""The import direction: trainer/ and evaluator/ are libraries that never import sweep/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Orchestration libraries belong to sweep/ alone.
FORBIDDEN = {"sweep", "optuna", "ray", "sqlalchemy"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_libraries_do_not_import_sweep_or_orchestration():
    offenders = {}
    files = [p for lib in ("trainer", "evaluator") for p in (ROOT / lib).rglob("*.py")]
    assert files, "no library sources found"
    for path in files:
        bad = imported_modules(path) & FORBIDDEN
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_the_checker_sees_imports(tmp_path):
    # The check itself must be able to fail.
    sample = tmp_path / "x.py"
    sample.write_text("import os\nfrom sweep.config import load_config\ndef f():\n    import ray\n")
    assert {"sweep", "ray"} <= imported_modules(sample)
