"""Run the six stages on a tiny config under different CPU settings and compare every output byte for byte.

    python scripts/check_determinism.py [--json OUT] [--keep DIR]

Settings (each in its own temp copy of the repo, stages run as `python -m stages.<name>`):
  pinned        the project's numerical pins (romer/core/numerics.py), numerics.threads 2
  older-cpu     the pins, plus what an older CPU presents to the libraries that look for themselves
                (glibc's hwcaps without AVX-512, MKL told the CPU has SSE4.2 only): MKL's COMPATIBLE
                path must not depend on what it finds, as it must not on an AMD CPU
  native        control: ROMER_NUMERICS=native (no pins), numerics.threads 2. On a CPU with AVX-512
                it is expected to DIFFER from `pinned`: that shows the check can see a kernel change.

`pinned` and `older-cpu` must be identical (exit 1 otherwise). The result table goes to stdout and,
with --json, to a file; `reference` in it holds the output hashes of `pinned`, to compare across
machines (benchmarks/results/determinism.json is the committed one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from romer.core.numerics import PINS, cpu_info

REPO = Path(__file__).resolve().parents[1]
STAGES = ("fetch_model", "fit_noise", "profile", "replace", "percentiles", "evaluate")
OUTPUTS = ("models/model", "noise", "artifacts/percentiles.json", "metrics")  # the DVC outputs
TINY = {
    "builtin": {"max_chars": 200_000, "vocab_size": 384, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                "num_experts": 8, "top_k": 2, "intermediate_size": 32, "seq_len": 64, "batch_size": 8,
                "steps": 40, "warmup_steps": 5, "eval_every": 20, "eval_windows": 4,
                "aux_loss_coef": 0.05},  # the reference's recipe (the default moved to 0.03 with the 64-expert testbed)
    "noise": {"source": "data/chip/pcm_sample.csv", "prog_scale": 3.0, "read_scale": 3.0},
    "calib": {"n_seqs": 8, "seq_len": 64, "batch_size": 8, "seeds": [100]},
    "eval": {"seq_len": 64, "max_tokens": 2048, "seeds": [0, 1], "tasks": ["builtin_cloze"], "task_limit": 8,
             "hetero_fractions": [0.25]},
    "mlflow": {"enabled": False},
}
NO_AVX512 = "glibc.cpu.hwcaps=" + ",".join(
    f"-{f}" for f in ("AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512VL", "AVX512ER", "AVX512PF"))
SETTINGS = {
    "pinned": ({}, 2),
    "older-cpu": ({"GLIBC_TUNABLES": NO_AVX512, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, 2),
    "native": ({"ROMER_NUMERICS": "native"}, 2),
}
PIN_VARS = (*PINS, "ROMER_NUMERICS", "GLIBC_TUNABLES")  # each setting starts from none of them


def _merge(base, over):
    for k, v in over.items():
        if isinstance(v, dict):
            _merge(base.setdefault(k, {}), v)
        else:
            base[k] = v
    return base


def make_copy(dst: Path, threads: int):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file() and f.startswith(("romer/", "stages/", "data/", "params.yaml")):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    p = dst / "params.yaml"
    params = _merge(yaml.safe_load(p.read_text()), _merge(json.loads(json.dumps(TINY)), {"numerics": {"threads": threads}}))
    p.write_text(yaml.safe_dump(params, sort_keys=False))


def run_setting(cwd: Path, extra_env: dict) -> float:
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARS}  # each setting starts from the CPU's own
    env.update(extra_env, PYTHONPATH=str(cwd), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(cwd / ".hf_home"), MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    t0 = time.perf_counter()
    for stage in STAGES:
        r = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=900)
        if r.returncode:
            raise SystemExit(f"stage {stage} failed in {cwd}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0


def output_hashes(cwd: Path) -> dict:
    """sha256 of every DVC output; eval.json without its `versions` block (compared separately)."""
    out = {}
    for top in OUTPUTS:
        for f in sorted([cwd / top] if (cwd / top).is_file() else (cwd / top).rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                if f.name == "eval.json":
                    ev = json.loads(data)
                    ev.pop("versions", None)
                    data = json.dumps(ev, sort_keys=True).encode()
                out[str(f.relative_to(cwd))] = hashlib.sha256(data).hexdigest()
    return out


def library_versions() -> dict:
    import importlib.metadata as md
    import platform

    return {"python": ".".join(platform.python_version_tuple()[:2]),
            **{d: md.version(d) for d in ("torch", "transformers", "numpy", "lm_eval", "tokenizers")}}


def capability(extra_env: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARS} | extra_env
    r = subprocess.run([sys.executable, "-c", "import romer, torch; print(torch.backends.cpu.get_cpu_capability())"],
                       env=env, capture_output=True, text=True, check=True)
    return r.stdout.strip()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the result table here")
    ap.add_argument("--keep", type=Path, help="keep the run directories under this directory")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="romer-determinism-")) if args.keep is None else args.keep
    runs = {}
    try:
        for name in args.settings:
            extra, threads = SETTINGS[name]
            cwd = root / name
            cwd.mkdir(parents=True)
            make_copy(cwd, threads)
            wall = run_setting(cwd, extra)
            runs[name] = {"env": extra, "threads": threads, "cpu_capability": capability(extra),
                          "wall_s": round(wall, 1), "outputs": output_hashes(cwd)}
            print(f"{name:10s} {runs[name]['cpu_capability']:7s} threads {threads}  {wall:6.1f} s  "
                  f"{len(runs[name]['outputs'])} files", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    ref = runs[args.settings[0]]["outputs"]
    result = {"cpu": cpu_info()["model"], "versions": library_versions(), "settings": {}, "reference": ref}
    for name, r in runs.items():
        differ = sorted(k for k in set(ref) | set(r["outputs"]) if ref.get(k) != r["outputs"].get(k))
        result["settings"][name] = {k: v for k, v in r.items() if k != "outputs"} | {"differing_files": differ}
        print(f"{name:10s} vs {args.settings[0]}: " + ("identical" if not differ else f"{len(differ)} files differ, "
                                                       f"e.g. {differ[:4]}"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    bad = "older-cpu" in runs and "pinned" in runs and result["settings"]["older-cpu"]["differing_files"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
