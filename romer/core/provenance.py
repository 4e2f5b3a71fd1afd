"""What a result was made from: content hashes of the model and noise model, the git commit, whether
the checkout differed from it, and the library versions. Recorded in metrics/eval.json
(`provenance`, `versions`) and as MLflow tags.

`git_dirty` ignores the outputs of the DVC stages (every outs/metrics/plots path of every dvc.yaml,
and the dvc.lock files): `dvc repro` rewrites the committed metrics files, which must not make the
next run look as if it came from uncommitted code.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os.path
import re
import subprocess
from pathlib import Path

# The files a model is loaded from (the same patterns the hub download fetches): weights, configs,
# tokenizer files and remote code. Anything else in a model directory does not change the model.
MODEL_FILES = ("*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.tiktoken")
_CHUNK = 1 << 20


def hash_file(path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def hash_dir(path, patterns=None, recursive=True) -> str:
    """One sha256 over a directory: its files' relative paths (sorted, '/'-separated) and the sha256 of
    each file's bytes. `patterns` (fnmatch on the file name) restricts the files; hidden files and
    directories (.git, .cache, temp files of a killed write) are skipped."""
    root = Path(path)
    files = root.rglob("*") if recursive else root.iterdir()
    rels = []
    for f in files:
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        if patterns is not None and not any(fnmatch.fnmatch(f.name, p) for p in patterns):
            continue
        rels.append(rel.as_posix())
    h = hashlib.sha256()
    for rel in sorted(rels):
        h.update(f"{rel}\0{hash_file(root / rel)}\n".encode())
    return h.hexdigest()


def model_files_sha256(path) -> str:
    """Content hash of the files a model loads from (MODEL_FILES, top level of the directory)."""
    return hash_dir(path, MODEL_FILES, recursive=False)


def model_sha256(model_dir) -> str | None:
    """Content hash of the model a stage loads from `model_dir` (models/model): the weights, config and
    tokenizer files there, or, for a local/hub source recorded as a source.json pointer, the hash of the
    source's files that fetch_model recorded (checked again whenever the model is loaded)."""
    p = Path(model_dir)
    if not p.is_dir():
        return None
    pointer = p / "source.json"
    if pointer.is_file():
        ref = json.loads(pointer.read_text())
        if ref.get("sha256"):
            return ref["sha256"]
    return model_files_sha256(p)


def _git(args, cwd=None) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True,
                          cwd=cwd).stdout


def git_commit(cwd=None) -> str:
    try:
        return _git(["rev-parse", "HEAD"], cwd).strip()
    except Exception:
        return "unknown"


def _entry_paths(entries) -> list[str]:
    """Paths of a dvc.yaml outs/metrics/plots list: plain strings or one-key {path: options} dicts."""
    out = []
    for entry in entries or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            out.extend(entry)
    return out


def _out_paths(stage: dict) -> list[str]:
    return [p for key in ("outs", "metrics", "plots") for p in _entry_paths(stage.get(key))]


def dvc_outputs(root) -> tuple[list[str], list[str]]:
    """Outputs of the DVC stages under `root` (a git top level), relative to it: (exact or directory
    paths, glob patterns). Paths with `${...}` (foreach/templated stages) become globs."""
    import yaml

    root = Path(root)
    try:
        listed = _git(["ls-files", "-co", "--exclude-standard"], root).splitlines()
    except Exception:
        listed = []
    yamls = {f for f in listed if f == "dvc.yaml" or f.endswith("/dvc.yaml")} | {"dvc.yaml"}
    paths, globs = [], []
    for rel in sorted(yamls):
        f = root / rel
        if not f.is_file():
            continue
        try:
            doc = yaml.safe_load(f.read_text()) or {}
        except Exception:
            continue
        base = Path(rel).parent
        paths.append((base / "dvc.lock").as_posix())
        for stage in (doc.get("stages") or {}).values():
            if not isinstance(stage, dict):
                continue
            body = stage.get("do", stage) if "foreach" in stage or "matrix" in stage else stage
            if not isinstance(body, dict):
                continue
            wdir = base / body.get("wdir", ".")
            for out in _out_paths(body):
                p = _normpath(wdir / out)
                if "${" in p:
                    globs.append(_template_glob(p))
                else:
                    paths.append(p)
        for out in [out for key in ("metrics", "plots") for out in _entry_paths(doc.get(key))]:
            p = _normpath(base / out)  # top-level sections name output files too
            if "${" in p:
                globs.append(_template_glob(p))
            else:
                paths.append(p)
    return paths, globs


def _normpath(p: Path) -> str:
    return os.path.normpath(p.as_posix()).replace("\\", "/").removeprefix("./")


def _template_glob(p: str) -> str:
    return re.sub(r"\$\{[^}]*\}", "*", p)


def _is_output(path: str, paths, globs) -> bool:
    for o in paths:
        if path == o or path.startswith(o.rstrip("/") + "/"):
            return True
    return any(fnmatch.fnmatch(path, g) for g in globs)


def git_dirty(cwd=None) -> str:
    """"true" when tracked files other than DVC outputs differ from the commit (the run may then not be
    reproducible from it), "false" when they do not, "unknown" outside a git checkout."""
    try:
        root = _git(["rev-parse", "--show-toplevel"], cwd).strip()
        out = _git(["status", "--porcelain", "-z", "--untracked-files=no"], root)
    except Exception:
        return "unknown"
    paths, globs = dvc_outputs(root)
    entries = out.split("\0")
    changed = []
    i = 0
    while i < len(entries):
        e = entries[i]
        i += 1
        if len(e) < 4:
            continue
        status, path = e[:2], e[3:]
        changed.append(path)
        if "R" in status or "C" in status:  # renames/copies: the next entry is the original path
            changed.append(entries[i])
            i += 1
    return "true" if any(not _is_output(p, paths, globs) for p in changed) else "false"


def versions() -> dict:
    """Versions of the libraries that decide the numbers (router semantics, kernels, task scoring)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("transformers", "transformers"), ("lm_eval", "lm_eval")):
        try:
            out[name] = md.version(dist)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def provenance(model_dir="models/model", noise_model="noise/noise_model.json") -> dict:
    """The `provenance` block of eval.json: content hashes only, so that a rerun of the same inputs
    writes the same bytes. The git commit and dirty state go to MLflow as tags (they change with
    every commit that reruns the figures, not with the figures)."""
    nm = Path(noise_model)
    return {
        "model_sha256": model_sha256(model_dir),
        "noise_model_sha256": hash_file(nm) if nm.is_file() else None,
    }
