"""ROMER+ combined with the heterogeneous analog-digital baseline (issue 13), on the VALIDATION split.

The heterogeneous baseline keeps the most sensitive experts of every MoE layer digital (largest
maximum neuron norm, romer.methods.hetero.sensitive_experts, at the paper's fractions of the
experts); ROMER+ keeps the routers digital and refits them per chip (romer.methods.router_refit).
Both fix different parts (expert weights and routing), so they may add up. Per chip (default
--seeds 1000-1004, disjoint from eval.seeds and calib.seeds), paired, all through
romer.pipeline.stages.evaluate_seed:

  noisy, romer_plus
  hetero_<pct>_attn_analog        the experts digital, everything else analog (attention too)
  hetero_<pct>_attn_analog_plus   ... and the routers refitted (ROMER+)
  hetero_<pct>                    the experts and the attention digital (as the baseline's paper)
  hetero_<pct>_plus               ... and the routers refitted

  python benchmarks/hetero_plus.py --out benchmarks/results/hetero_plus.json
"""

from __future__ import annotations

import argparse
import time

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)

from romer.core.io import write_json
from romer.evaluation.measure import perplexity
from romer.methods.hetero import sensitive_experts
from romer.moe.routing import Recorder
from romer.pipeline.stages import _pct_to_json, clean_percentiles, clean_router_targets, evaluate_seed

from ablation import compare  # noqa: E402  (benchmarks/ is the script's directory)
from validation import (MODELS, add_family_args, add_validation_args, family_out, validation_experiment,  # noqa: E402
                        validation_params)


def specs_for(exp, fractions) -> dict:
    no_attn = [k for k in exp.analog_kinds if k != "attention"]
    specs = {"noisy": dict(plan=None, cal=None), "romer_plus": dict(plan=None, cal=None, router="refit")}
    exp.set_state(None)
    for f in fractions:
        d = sensitive_experts(exp.adapter, exp.model, f)
        name = f"hetero_{100 * f:g}pct"
        specs[f"{name}_attn_analog"] = dict(plan=None, cal=None, digital=d)
        specs[f"{name}_attn_analog_plus"] = dict(plan=None, cal=None, digital=d, router="refit")
        specs[name] = dict(plan=None, cal=None, kinds=no_attn, digital=d)
        specs[f"{name}_plus"] = dict(plan=None, cal=None, kinds=no_attn, digital=d, router="refit")
    return specs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_validation_args(ap, max_tokens=32768)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25],
                    help="fractions of each layer's experts kept digital")
    add_family_args(ap, "hetero_plus")
    args = ap.parse_args(argv)
    family_out(args, "hetero_plus")
    t0 = time.time()
    params = validation_params(args)
    exp, eval_w, calib_w = validation_experiment(args, params, model_dir=MODELS[args.family])
    e = params.eval
    exp.set_state(None)
    clean_rec = Recorder(indices=True)
    clean = perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device, None, clean_rec)
    print(f"clean PPL on {args.dataset}: {clean:.3f} ({eval_w.numel()} tokens)")
    pct = {"clean": _pct_to_json(clean_percentiles(exp, calib_w))}
    targets = clean_router_targets(exp, calib_w)
    specs = specs_for(exp, args.fractions)
    rows = {}
    for seed in args.seeds:
        got = evaluate_seed(exp, seed, eval_w, calib_w, None, pct, clean_rec, specs, router_targets=targets)
        for name, r in got.items():
            rows.setdefault(name, []).append(r["ppl"])
        print(f"seed {seed} ({time.time() - t0:.0f} s): " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in rows.items()),
              flush=True)
    exp.restore()
    # compare() reports every method against "romer"; here the reference is ROMER+ (the router refit)
    rows["romer"] = rows.pop("romer_plus")
    out = compare(rows)
    out = {"note": "'romer' in this file is romer_plus (the router refit), the reference of every romer_vs row",
           "family": args.family, "dataset": args.dataset, "tokens": int(eval_w.numel()), "seeds": args.seeds,
           "clean_ppl": clean,
           "fractions": args.fractions, **out, "seconds": time.time() - t0}
    write_json(args.out, out)
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
