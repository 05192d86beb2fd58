"""The code's structure, checked: the import direction between the packages, no import cycle inside one, and
every reach into a third party's private internals inside a compat module (`trainer/compat.py`,
`evaluator/compat.py`, `sweep/compat.py`)."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sweep", "trainer", "evaluator")
# Orchestration libraries belong to sweep/ alone.
FORBIDDEN = {"sweep", "optuna", "ray", "sqlalchemy"}
FENCED = ("lm_eval", "transformers", "bitsandbytes", "datasets", "optuna")
"""The libraries whose internals only a compat module may name."""
COMPAT_MODULES = {f"{package}/compat.py" for package in PACKAGES}
ALLOWED: dict[str, set[str]] = {}
"""Private names a module outside the compat layers may use anyway, by module: empty, and it stays so."""
HOOKED = {
    "apply_template", "build_all_requests", "doc_iterator", "process_results", "batch_size_per_gpu",
    "apply_rotary_pos_emb", "gradient_checkpointing", "_attn_implementation",
}
"""Public-looking attributes of the fenced libraries' objects that a hook rebinds; assigning one (or a module's
`forward`) outside the compat layers is a reach into their internals."""


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def sources(*packages: str) -> list[Path]:
    files = [p for package in packages for p in sorted((ROOT / package).rglob("*.py"))]
    assert files, "no sources found"
    return files


def test_libraries_do_not_import_sweep_or_orchestration():
    offenders = {}
    for path in sources("trainer", "evaluator"):
        bad = imported_modules(path) & FORBIDDEN
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_the_checker_sees_imports(tmp_path):
    # The check itself must be able to fail.
    sample = tmp_path / "x.py"
    sample.write_text("import os\nfrom sweep.config import load_config\ndef f():\n    import ray\n")
    assert {"sweep", "ray"} <= imported_modules(sample)


# --- import cycles -----------------------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path, package: str, known: set[str]) -> set[str]:
    """The modules of `package` that `path` imports, at module level or inside a function alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from sweep import cluster` imports the module sweep.cluster.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == package and n in known)
    return found - {module_name(path)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package):
    files = sources(package)
    known = {module_name(p) for p in files}
    graph = {module_name(p): internal_imports(p, package, known) for p in files}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# --- the compat fence --------------------------------------------------------------------------------------------

_DEFINED = re.compile(
    r"(?:def|class)\s+(_[A-Za-z]\w*)|\.(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=(?!=)|^\s*(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=(?!=)",
    re.M,
)


@functools.lru_cache(maxsize=None)
def private_names(library: str) -> frozenset[str]:
    """The underscore names (not dunders) `library`'s installed source defines or assigns: functions, classes,
    attributes, module globals, and its private modules and packages."""
    spec = importlib.util.find_spec(library)
    assert spec is not None and spec.origin, f"{library} is not installed"
    root = Path(spec.origin).parent
    names = set()
    for path in root.rglob("*.py"):
        names.update(p for p in path.relative_to(root).with_suffix("").parts if p.startswith("_"))
        for match in _DEFINED.finditer(path.read_text(errors="ignore")):
            names.add(next(g for g in match.groups() if g))
    return frozenset(n for n in names if not n.startswith("__"))


def fenced_private_names() -> dict[str, str]:
    """Each private name of a fenced library, with (one of) the libraries that define it."""
    return {name: library for library in FENCED for name in private_names(library)}


def own_names(tree: ast.AST) -> set[str]:
    """The underscore names a module defines itself (its functions, classes, globals, and attributes it assigns
    on `self`): `self._storage` of our own class is not Optuna's."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Attribute) and _is_self(sub):  # `task._instances = ...` is not ours
                        names.add(sub.attr)
                    elif isinstance(sub, ast.Name):
                        names.add(sub.id)
    return {n for n in names if n.startswith("_")}


def reaches(source: str, filename: str, private: dict[str, str]) -> list[str]:
    """Where `source` names a fenced library's internals: `line: what`."""
    tree = ast.parse(source, filename=filename)
    own = own_names(tree) - _overridden(tree)
    found = []

    def add(node: ast.AST, what: str) -> None:
        found.append(f"{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] in FENCED:
                bad = [p for p in parts[1:] if p.startswith("_")]
                bad += [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if bad:
                    add(node, f"imports {node.module}: {', '.join(bad)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in FENCED and any(p.startswith("_") for p in parts[1:]):
                    add(node, f"imports {alias.name}")
        elif isinstance(node, ast.Attribute):
            attr = node.attr
            if attr in private and attr not in own and not attr.startswith("__"):
                add(node, f"{private[attr]}'s {attr}")
            elif isinstance(node.ctx, ast.Store) and (attr in HOOKED or attr == "forward") and not _is_self(node):
                add(node, f"rebinds {attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "setattr", "hasattr") and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                if (name.value in private and name.value not in own) or (
                        node.func.id == "setattr" and (name.value in HOOKED or name.value == "forward")):
                    add(node, f"{node.func.id}(..., {name.value!r})")
        elif isinstance(node, ast.ClassDef) and node.bases:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in private and not item.name.startswith("__"):
                    add(item, f"overrides {private[item.name]}'s {item.name}")
    return found


def _overridden(tree: ast.AST) -> set[str]:
    """The methods of classes with bases: a private one there overrides the base's, it is not a name of ours."""
    return {item.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.bases
            for item in node.body if isinstance(item, ast.FunctionDef)}


def _is_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


def test_internals_of_third_parties_stay_in_the_compat_layers():
    private = fenced_private_names()
    offenders = {}
    for path in sources(*PACKAGES):
        rel = str(path.relative_to(ROOT))
        if rel in COMPAT_MODULES:
            continue
        found = [r for r in reaches(path.read_text(), rel, private)
                 if r.split("'s ")[-1] not in ALLOWED.get(rel, set())]
        if found:
            offenders[rel] = found
    assert offenders == {}, "reaches into third-party internals outside the compat layers"


def test_the_fence_sees_each_kind_of_reach():
    private = fenced_private_names()
    for name in ("_trial_id", "_fingerprint", "_instances", "_model_generate", "_attn_implementation",
                 "_convert_weight_packed_for_cpu_inverse", "_rdb"):
        assert name in private, name
    sample = (
        "from optuna.storages._rdb import models\n"
        "from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse\n"
        "import lm_eval.utils as u\n"
        "class Mine:\n"
        "    def __init__(self, s):\n"
        "        self._storage = s\n"          # our own attribute: fine
        "    def read(self):\n"
        "        return self._storage\n"
        "class LM(Base):\n"
        "    def _model_generate(self):\n"    # an override of lm-eval's private method
        "        return 1\n"
        "def f(trial, task, ds, model, layer):\n"
        "    task._instances = []\n"
        "    u.apply_template = None\n"
        "    layer.forward = None\n"
        "    model.config._attn_implementation\n"
        "    getattr(ds, '_fingerprint')\n"
        "    return trial._trial_id\n"
    )
    found = reaches(sample, "sample.py", private)
    text = "\n".join(found)
    for what in ("_rdb", "_convert_weight_packed_for_cpu_inverse", "overrides lm_eval's _model_generate",
                 "_instances", "rebinds apply_template", "rebinds forward", "_attn_implementation",
                 "getattr(..., '_fingerprint')", "_trial_id"):
        assert what in text, (what, found)
    assert not any("_storage" in f for f in found), found


def all_hooks() -> list:
    from evaluator import compat as evaluator_compat
    from sweep import compat as sweep_compat
    from trainer import compat as trainer_compat

    return [*trainer_compat.HOOKS, *evaluator_compat.HOOKS, *sweep_compat.HOOKS]


def test_every_hook_is_checked_against_pyprojects_bound():
    import tomllib
    from packaging.requirements import Requirement

    bounds = {}
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        bounds[requirement.name.lower()] = str(requirement.specifier)
    hooks = all_hooks()
    assert {h.library for h in hooks} >= {"lm-eval", "transformers", "bitsandbytes", "datasets", "optuna"}
    from packaging.specifiers import SpecifierSet

    for hook in hooks:
        assert SpecifierSet(hook.checked) == SpecifierSet(bounds[hook.library]), (hook.name, hook.checked)
        assert any(s.operator == "<" for s in SpecifierSet(hook.checked)), f"{hook.name}: no upper bound"
