"""Which MKL reproducibility mode gives the same weights whatever the CPU (docs/reproducibility.md).

Trains the builtin recipe for a few steps in fresh processes under MKL settings, each with the other
numerical pins of romer/core/numerics.py, and prints the sha256 of the weights and the wall time:

    python benchmarks/cnr_modes.py [--steps 40] [--json benchmarks/results/cnr_modes.json]

A mode that is independent of the CPU gives one hash whatever MKL is told the CPU has
(MKL_ENABLE_INSTRUCTIONS, glibc's hwcaps): that is how its vendor and ISA dispatch works.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from check_determinism import NO_AVX512  # noqa: E402  (glibc's hwcaps without AVX-512, as that check uses)
# (name, environment on top of the pins, threads)
SETTINGS = [
    ("AVX2,STRICT (the old pin)", {"MKL_CBWR": "AVX2,STRICT"}, 2),
    ("COMPATIBLE (the pin)", {"MKL_CBWR": "COMPATIBLE"}, 2),
    ("COMPATIBLE, MKL told SSE4.2, glibc without AVX-512", {"MKL_CBWR": "COMPATIBLE",
                                                            "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                                                            "GLIBC_TUNABLES": NO_AVX512}, 2),
    ("COMPATIBLE,STRICT", {"MKL_CBWR": "COMPATIBLE,STRICT"}, 2),
    ("COMPATIBLE, 1 thread", {"MKL_CBWR": "COMPATIBLE"}, 1),
]

CHILD = r"""
import hashlib, json, os, sys, time
import romer
import torch
from romer.builtin.train import train_builtin
from romer.core.numerics import set_determinism
from romer.core.params import load_params

steps, out, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
p = load_params()
set_determinism(threads)
cfg = p.builtin.model_copy(update={"steps": steps, "eval_every": None, "eval_windows": 4, "eval_tokens": 8192})
t = time.time()
rep = train_builtin(cfg, out, progress=False)
wall = time.time() - t
sha = hashlib.sha256(open(os.path.join(out, "model.safetensors"), "rb").read()).hexdigest()[:16]
print(json.dumps({"sha256_16": sha, "train_s": round(wall, 1), "val_loss": rep.get("val_loss"),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    import romer  # noqa: F401  (the pins, to start each child from them)
    from romer.core.numerics import PINS, cpu_info

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, env, threads) in enumerate(SETTINGS):
            e = {k: v for k, v in os.environ.items() if k not in PINS and k != "GLIBC_TUNABLES"}
            e.update(PINS)
            e.update(env, PYTHONPATH=str(REPO))
            r = subprocess.run([sys.executable, "-c", CHILD, str(a.steps), f"{tmp}/{i}", str(threads)], cwd=REPO,
                               env=e, capture_output=True, text=True, check=True)
            row = {"setting": name, "env": env, "threads": threads, **json.loads(r.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{name:52s} threads {threads}  {row['sha256_16']}  {row['train_s']:6.1f} s", flush=True)
    out = {"cpu": cpu_info()["model"], "vendor": cpu_info()["vendor"], "steps": a.steps, "settings": rows}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
