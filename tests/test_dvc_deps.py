"""DVC deps are complete: every project file a stage imports is covered by one of its declared deps.

The import closure of each stage's entry point is walked with `ast` (function-level imports
included): an import of romer.a.b covers romer/__init__.py, romer/a/__init__.py and romer/a/b.py
(or romer/a/b/__init__.py). A file outside every declared dep means that editing it would not rerun
the stage that uses it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("romer", "stages")


def _module_file(mod: str) -> Path | None:
    base = ROOT.joinpath(*mod.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        pkg = pkg.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from romer.x import module`
    return {m for m in out if m.split(".")[0] in PACKAGES}


def import_closure(entry: Path) -> set[Path]:
    todo, seen = [entry], set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for mod in _imported_modules(f):
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):  # every parent package's __init__ runs too
                p = _module_file(".".join(parts[:i]))
                if p is not None:
                    todo.append(p)
    return seen


def _stages():
    for dvc_file in (ROOT / "dvc.yaml", ROOT / "beyond" / "dvc.yaml"):
        for name, st in yaml.safe_load(dvc_file.read_text())["stages"].items():
            st = st.get("do", st)  # foreach stages
            wdir = (dvc_file.parent / st.get("wdir", ".")).resolve()
            yield f"{dvc_file.relative_to(ROOT)}:{name}", st, wdir


def _entry(cmd: str) -> Path:
    words = cmd.split()
    assert words[:2] == ["python", "-m"], f"stage cmd should be `python -m stages.<name>`: {cmd!r}"
    return _module_file(words[2])


STAGES = list(_stages())


@pytest.mark.parametrize("name,stage,wdir", STAGES, ids=[s[0] for s in STAGES])
def test_stage_deps_cover_import_closure(name, stage, wdir):
    deps = [(wdir / d).resolve() for d in stage["deps"]]
    entry = _entry(stage["cmd"])
    assert entry is not None and entry in deps, f"{name}: the entry point must be a dep"
    missing = sorted(str(f.relative_to(ROOT)) for f in import_closure(entry)
                     if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"{name}: imported but not a declared dep: {missing}"
    for d in deps:  # code deps must exist; data deps (models/model, ...) are outputs of earlier stages
        if d.is_relative_to(ROOT / "romer") or d.is_relative_to(ROOT / "stages"):
            assert d.exists(), f"{name}: dep {d} does not exist"


def test_closure_sees_function_level_imports():
    files = {str(f.relative_to(ROOT)) for f in import_closure(ROOT / "stages" / "fetch_model.py")}
    assert "romer/moe/models.py" in files  # imported inside run_fetch_model only
    assert "romer/__init__.py" in files and "romer/core/numerics.py" in files


def _missing_params(stage, params: dict) -> list:
    missing = []
    for p in stage.get("params") or []:
        keys = [p] if isinstance(p, str) else [k for f, ks in p.items() if f == "params.yaml" for k in ks]
        for key in keys:
            d = params
            for part in key.split("."):
                if not isinstance(d, dict) or part not in d:
                    missing.append(key)
                    break
                d = d[part]
    return missing


@pytest.mark.parametrize("name,stage,wdir", STAGES, ids=[s[0] for s in STAGES])
def test_stage_params_exist_in_params_yaml(name, stage, wdir):
    """A params key that params.yaml lacks makes `dvc repro` fail (missing params) and hides the keys
    that replaced it from the stage's change detection."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = _missing_params(stage, params)
    assert not missing, f"{name}: params not in params.yaml: {missing}"


def test_noise_strength_params_rerun_the_noisy_stages():
    """Every noisy stage depends on the noise strengths (they replaced noise.scale)."""
    for name, stage, _ in STAGES:
        declared = [p for p in stage.get("params") or [] if isinstance(p, str)]
        if "noise.t_inference_s" in declared:  # a stage that reads noisy weights
            for key in ("noise.prog_scale", "noise.read_scale", "noise.drift_scale"):
                assert key in declared or "noise" in declared, f"{name}: {key} is not a param dep"
