"""Recipe search for the embedded fine-grained testbed (64 experts, top-8): choose on VALIDATION.

Each candidate overrides the `builtin` params of params.yaml, trains from scratch with
romer.builtin.train.train_builtin (same corpus, tokenizer, seed and optimiser), and is scored on
the full validation split. A candidate is admissible when every layer is balanced on the
validation tokens: load CV <= 0.5 and no expert under a quarter of a fair share. The chosen one is
the admissible candidate with the lowest validation perplexity; its test perplexity is reported
for the record, never used to choose.

  python benchmarks/testbed_recipe.py --out benchmarks/results/testbed_recipe.json [--only NAME ...]

Candidates already in --out are skipped (a long search survives an interrupted session). The
pilot step times of 64-group grouped_mm on this CPU, and the choice, are in docs/builtin_model.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)

from romer.builtin.train import train_builtin, tune_malloc
from romer.core.io import write_json
from romer.core.numerics import cpu_info, set_determinism
from romer.core.params import load_params

FINE = {"num_experts": 64, "top_k": 8, "intermediate_size": 32}
CANDIDATES = {  # run in this order; the first two showed layer 0 is the one to balance
    "64x32 top-8, 4x128, aux 0.01": {**FINE, "aux_loss_coef": 0.01},
    "64x32 top-8, 4x128, aux 0.02": {**FINE, "aux_loss_coef": 0.02},
    "64x32 top-8, 4x128, aux 0.03": {**FINE, "aux_loss_coef": 0.03},
    # not run: the 0.01 -> 0.02 -> 0.03 trend (val PPL 60.38, 60.72, 60.88) makes 0.05 the worst admissible one
    "64x32 top-8, 4x128, aux 0.05": {**FINE, "aux_loss_coef": 0.05},
    "64x32 top-8, 6x96, aux 0.03, 1300 steps": {**FINE, "aux_loss_coef": 0.03, "hidden_size": 96,
                                                "num_layers": 6, "steps": 1300},
}


def score(report: dict) -> dict:
    """Validation-side figures of one trained candidate (and the test PPL, for the record)."""
    E = report["config"]["num_experts"]
    layers = report["per_layer"]
    min_share = min(min(d["load"]) * E for d in layers)
    max_cv = max(d["cv"] for d in layers)
    return {
        "val_ppl": report["val_ppl"], "test_ppl": report["test_ppl"],
        "max_cv": round(max_cv, 4), "min_load_share_of_fair": round(min_share, 4),
        "cv_per_layer": [round(d["cv"], 4) for d in layers],
        "admissible": bool(max_cv <= 0.5 and min_share >= 0.25),
        "params": report["params"], "active_params": report["active_params"],
        "train_time_s": report["train_time_s"],
        "overrides": None,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/testbed_recipe.json")
    ap.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    args = ap.parse_args(argv)

    params = load_params()
    set_determinism(params.numerics.threads)
    tune_malloc()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"candidates": {}}
    info = cpu_info()
    results["cpu"] = {k: info[k] for k in ("vendor", "model")}
    for name, over in CANDIDATES.items():
        if (args.only and name not in args.only) or name in results["candidates"]:
            continue
        cfg = params.builtin.model_copy(update=over)
        cfg = type(cfg)(**cfg.model_dump())  # validate the combination
        print(f"== {name}: {over}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            report = train_builtin(cfg, Path(tmp) / "model", progress=False)
        s = score(report)
        s["overrides"] = over
        results["candidates"][name] = s
        print(json.dumps({name: s}), flush=True)
        write_json(out, results)
    ok = {n: s for n, s in results["candidates"].items() if s["admissible"] and s["overrides"].get("num_experts") == 64}
    results["chosen"] = min(ok, key=lambda n: ok[n]["val_ppl"]) if ok else None
    write_json(out, results)
    print("chosen (lowest validation PPL among balanced 64-expert candidates):", results["chosen"])


if __name__ == "__main__":
    main()
