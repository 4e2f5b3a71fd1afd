"""Ablation that chooses the defaults of the method, on the VALIDATION split (never test).

Parts (each optional):
  scales     noisy PPL against the noise strength (a multiplier of noise.prog_scale and read_scale).
  parts      damage decomposition: noise on one analog kind at a time (router, attention, ...).
  methods    ROMER variants at the default noise: replacement strategy x tau, percentiles,
             calibration mode and layer-wise calibration; each against the same noisy seeds.

  python benchmarks/ablation.py --parts scales parts methods --out metrics/ablation.json

Results go to the JSON (committed) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import time

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)
import torch

from romer.evaluation.measure import mean_ci, paired_reduction, perplexity
from romer.core.numerics import set_determinism
from romer.pipeline.experiment import Experiment, with_strength
from romer.core.io import write_json
from romer.core.params import load_params
from romer.pipeline.stages import compute_percentiles, evaluate_seed, profile_routing
from romer.methods.replacement import make_plan
from romer.moe.routing import Recorder


def with_params(exp, **sections):
    """exp.params with some keys replaced, e.g. replace={"tau": 0.5}."""
    upd = {k: getattr(exp.params, k).model_copy(update=v) for k, v in sections.items()}
    return exp.params.model_copy(update=upd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="builtin-validation")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--parts", nargs="+", default=["scales", "parts", "limits", "methods"])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    ap.add_argument("--scale", type=float, default=1.0, help="noise strength of the method ablation (default 1)")
    ap.add_argument("--strategies", nargs="+", default=["copy_router", "split", "average"])
    ap.add_argument("--taus", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--percentiles", type=float, nargs="+", default=[5, 95, 25, 75, 10, 90, 1, 99])
    ap.add_argument("--out", default="metrics/ablation.json")
    args = ap.parse_args(argv)

    t0 = time.time()
    params = load_params()
    set_determinism(params.numerics.threads)
    exp = Experiment(params)
    e = params.eval
    eval_w = exp.windows(args.dataset, e.seq_len, max_tokens=args.max_tokens)
    calib_w = exp.calib_windows()
    exp.set_state(None)
    clean_rec = Recorder(indices=True)
    clean = perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device, None, clean_rec)
    out = {"dataset": args.dataset, "tokens": int(eval_w.numel()), "seeds": args.seeds, "clean_ppl": clean,
           "noise_source": params.noise.source}
    print(f"clean PPL on {args.dataset}: {clean:.2f} ({eval_w.numel()} tokens)")

    def noisy_ppl(seed, **kw):
        exp.set_state(seed, **kw)
        return perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device)

    if "scales" in args.parts:
        rows = []
        for s in args.scales:
            st = mean_ci([noisy_ppl(seed, scale=s) for seed in args.seeds])
            rows.append({"scale": s, "noisy": st, "ratio_to_clean": st["mean"] / clean})
            print(f"scale {s:6.2f}: noisy PPL {st['mean']:.2f} +/- {st['std']:.2f} ({st['mean'] / clean:.2f}x clean)")
        out["scales"] = rows

    scale = args.scale
    exp.params = with_strength(exp.params, scale)
    out["scale"] = scale

    if "parts" in args.parts:
        parts = {}
        for kind in exp.analog_kinds + ["all"]:
            kinds = None if kind == "all" else [kind]
            parts[kind] = mean_ci([noisy_ppl(seed, kinds=kinds) for seed in args.seeds])
            print(f"noise on {kind:15s}: PPL {parts[kind]['mean']:.2f}")
        out["damage_by_part"] = parts

    if "limits" in args.parts:
        # What routing repair could reach at best: noisy weights, but every token routed to its clean
        # top-k set (weights from the noisy logits restricted to that set, as the family routes).
        from romer.moe.routing import LayerRouting

        def oracle_plan():
            queues = {layer: list(clean_rec.indices[layer]) for layer in exp.layers}
            pos = {layer: 0 for layer in exp.layers}

            def make(layer):
                def transform(logits):
                    idx = queues[layer][pos[layer]].long().to(logits.device)
                    pos[layer] += 1
                    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)
                    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
                return LayerRouting(transform=transform)
            return {layer: make(layer) for layer in exp.layers}

        rows = {"noisy": [], "oracle_routing": []}
        for seed in args.seeds:
            rows["noisy"].append(noisy_ppl(seed))
            rows["oracle_routing"].append(perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device,
                                                     oracle_plan()))
        out["limits"] = {k: mean_ci(v) for k, v in rows.items()}
        red, ci = paired_reduction(rows["noisy"], rows["oracle_routing"])
        out["limits"]["oracle_reduction_pct"], out["limits"]["oracle_reduction_ci95"] = red, ci
        print(f"oracle routing (clean top-k sets on the noisy model): PPL {out['limits']['oracle_routing']['mean']:.2f} "
              f"vs noisy {out['limits']['noisy']['mean']:.2f} ({red:+.1f}%)")

    if "methods" in args.parts:
        profile = profile_routing(exp, calib_w)
        out["profile_noisy_mean"] = profile["noisy_mean"]
        pct_pairs = [tuple(args.percentiles[i:i + 2]) for i in range(0, len(args.percentiles), 2)]
        base_pct = tuple(params.calibrate.percentiles)
        configs = []
        # replacement strategy x tau, with the default percentiles and both calibration modes
        for strategy, tau in itertools.product(args.strategies, args.taus):
            configs.append(dict(strategy=strategy, tau=tau, percentiles=base_pct, layerwise=True))
        # percentiles and layer-wise calibration, with the first strategy and tau
        for pc in pct_pairs:
            if pc != base_pct:
                configs.append(dict(strategy=args.strategies[0], tau=args.taus[0], percentiles=pc, layerwise=True))
        configs.append(dict(strategy=args.strategies[0], tau=args.taus[0], percentiles=base_pct, layerwise=False))
        results = []
        for cfg in configs:
            t1 = time.time()
            exp.params = with_params(exp, replace={"tau": cfg["tau"], "strategy": cfg["strategy"]},
                         calibrate={"percentiles": cfg["percentiles"], "layerwise": cfg["layerwise"]})
            plan = make_plan(profile["noisy_load"], cfg["tau"], exp.params.replace.max_per_layer, cfg["strategy"])
            pct = compute_percentiles(exp, plan, calib_w)
            per_seed = {s: evaluate_seed(exp, s, eval_w, calib_w, plan, pct, clean_rec,
                                         modes=("per_chip", "expected")) for s in args.seeds}
            names = list(per_seed[args.seeds[0]])
            ppl = {n: mean_ci([per_seed[s][n]["ppl"] for s in args.seeds]) for n in names}
            red = {n: paired_reduction(ppl["noisy"]["per_seed"], ppl[n]["per_seed"]) for n in names if n != "noisy"}
            agree = {n: sum(per_seed[s][n]["routing"]["mean"]["routing_agreement"] for s in args.seeds) / len(args.seeds)
                     for n in names}
            cv = {n: sum(per_seed[s][n]["routing"]["mean"]["cv"] for s in args.seeds) / len(args.seeds) for n in names}
            row = {**cfg, "percentiles": list(cfg["percentiles"]), "replaced_expected_plan": plan["replaced"],
                   "replaced_per_chip": sum(per_seed[s]["romer"]["replaced"] for s in args.seeds) / len(args.seeds),
                   "ppl": ppl, "reduction_pct": {n: r[0] for n, r in red.items()},
                   "reduction_ci95": {n: r[1] for n, r in red.items()}, "routing_agreement": agree, "cv": cv,
                   "seconds": round(time.time() - t1, 1)}
            results.append(row)
            print(f"{cfg['strategy']:11s} tau={cfg['tau']:.2f} pct={cfg['percentiles']} layerwise={cfg['layerwise']} "
                  f"replaced/chip={row['replaced_per_chip']:.1f}: noisy {ppl['noisy']['mean']:.2f} | "
                  + " | ".join(f"{n} {ppl[n]['mean']:.2f} ({row['reduction_pct'][n]:+.1f}%)" for n in names if n != "noisy"))
        out["methods"] = results
    exp.restore()
    out["seconds"] = round(time.time() - t0, 1)
    write_json(args.out, out)
    print(f"wrote {args.out} in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
