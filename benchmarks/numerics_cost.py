"""What the numerical pins cost in speed (docs/reproducibility.md).

Trains the builtin recipe for a few steps and times one evaluation pass over the trained model, in
fresh processes, alternating pinned and native (ROMER_NUMERICS=native) runs so that drift of a
shared machine hits both alike; reports the best and the median of each.

    python benchmarks/numerics_cost.py [--steps 120] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import romer
import torch
from romer.builtin.train import train_builtin
from romer.core.numerics import modes, set_determinism
from romer.core.params import load_params
from romer.evaluation.measure import perplexity
from romer.moe.adapters import get_adapter

steps, out = int(sys.argv[1]), sys.argv[2]
p = load_params()
set_determinism(p.numerics.threads)
cfg = p.builtin.model_copy(update={"steps": steps, "eval_every": None, "eval_windows": 4, "eval_tokens": 8192})
rep, model = train_builtin(cfg, out, progress=False, return_model=True)
w = torch.randint(0, cfg.vocab_size, (32, 256), generator=torch.Generator().manual_seed(0))
best = float("inf")
for _ in range(3):
    t0 = time.perf_counter()
    perplexity(model, get_adapter(model), w, 8, "cpu")
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"train_s": rep["train_time_s"], "eval_pass_s": round(best, 4), **modes()}))
"""


def run(native: bool, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ROMER_NUMERICS"}
    if native:
        env["ROMER_NUMERICS"] = "native"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(Path(d) / "m")], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = {"pinned": [], "native": []}
    for i in range(args.repeats):
        for name in ("pinned", "native") if i % 2 == 0 else ("native", "pinned"):
            runs[name].append(run(name == "native", args.steps))
            print(name, runs[name][-1], flush=True)
    out = {"steps": args.steps, "repeats": args.repeats, "runs": runs}
    for key in ("train_s", "eval_pass_s"):
        for name in runs:
            vals = [r[key] for r in runs[name]]
            out[f"{name}_{key}_best"], out[f"{name}_{key}_median"] = min(vals), statistics.median(vals)
        out[f"cost_{key}_best_pct"] = round(100 * (out[f"pinned_{key}_best"] / out[f"native_{key}_best"] - 1), 1)
        out[f"cost_{key}_median_pct"] = round(100 * (out[f"pinned_{key}_median"] / out[f"native_{key}_median"] - 1), 1)
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
