"""The layout is a contract: the method modules (sae, guides, detectors, evaluation) never import Ray, the store
never imports a method module, and stage code never spells a table name or an SQL string."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "spg_dist"
METHODS = ("spg_dist.sae", "spg_dist.guides", "spg_dist.detectors", "spg_dist.evaluation")
TABLES = ("patch_tokens", "images", "errors", "sae_models", "sae_codes", "atom_index", "atom_top", "guides",
          "eval_results", "detector_models", "corruptions", "sweep_trials", "atom_images")


PROBE = """
import importlib, json, pkgutil, sys
report = {}
def load(name):
    before = set(sys.modules)
    importlib.import_module(name)
    return sorted(set(sys.modules) - before)
pkg = importlib.import_module("spg_dist")
for group in ["spg_dist.store", *METHODS]:
    mod = importlib.import_module(group) if group != "spg_dist.store" else None
    names = [group] + [f"{group}.{m.name}" for m in pkgutil.iter_modules([pkg.__path__[0] + "/" + group.split(".")[1]])]
    report[group] = sorted({x for n in names for x in load(n)})
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    """What importing the store, then each method package (all submodules), newly loads, in one fresh
    interpreter: the store first, so whatever it pulls in is attributed to it."""
    code = f"METHODS = {list(METHODS)!r}" + PROBE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ray(mods: list[str]) -> list[str]:
    return [m for m in mods if m in ("ray", "lance_ray") or m.startswith(("ray.", "spg_dist.ray", "spg_dist.stages"))]


@pytest.mark.parametrize("module", METHODS)
def test_method_modules_do_not_import_ray(loaded, module):
    assert not _ray(loaded[module]), f"{module} pulls in {_ray(loaded[module])[:5]}"


def test_store_imports_no_method_module(loaded):
    mods = loaded["spg_dist.store"]
    bad = sorted(m for m in mods if any(m == x or m.startswith(x + ".") for x in METHODS))
    assert not bad, f"the store imports method modules: {bad}"
    assert not _ray(mods)


def _string_constants(path: Path):
    """String constants that are values, not keys: dict keys, subscripts and comparisons ("images" as a JSON key
    or a count's name) are not table names."""
    tree = ast.parse(path.read_text())
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        up = parent.get(node)
        if isinstance(up, ast.Dict) and node in up.keys or isinstance(up, (ast.Subscript, ast.Compare)):
            continue
        if isinstance(up, ast.Call) and isinstance(up.func, ast.Attribute) and up.func.attr in ("get", "pop"):
            continue
        yield node


def test_stage_code_spells_no_table_name_and_no_sql():
    """Table names live in their store module (TABLE = ...); filters come from spg_dist.store.filters."""
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path.parts[-2] == "store":
            continue
        for node in _string_constants(path):
            if node.value in TABLES:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} table name {node.value!r}")
            if any(tok in node.value for tok in (" = '", " IN (", "' AND ", " AND ")) and "{" not in node.value:
                if "WHERE" in node.value.upper() or " = '" in node.value or " IN (" in node.value:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} SQL {node.value!r}")
        text = path.read_text()
        for pattern in ("sql_literal", "where_clause"):
            if pattern in text:
                offenders.append(f"{path.relative_to(ROOT)}: uses {pattern}")
    assert not offenders, "\n".join(offenders)


def test_ray_code_sits_in_one_package():
    """Only spg_dist/ray imports Ray (besides lazy imports in the CLI and stage code that call into it)."""
    outside = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "ray":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "ray" or n.startswith("ray.") or n == "lance_ray" for n in names):
                outside.append(f"{rel}:{node.lineno}")
    assert not outside, f"Ray imported outside spg_dist/ray: {outside}"
