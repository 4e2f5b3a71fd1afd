"""Ablation that chooses the defaults of the method, on the VALIDATION split (never test).

Parts (each optional):
  scales     noisy PPL against the noise strength (a multiplier of noise.prog_scale and read_scale).
  parts      damage decomposition: noise (and the periphery) on one analog kind at a time (router,
             attention, ...).
  limits     what routing repair can reach at best: the noisy model routed to the clean top-k sets
             (weights from its own logits), and routed exactly as the clean model (clean logits).
  baselines  ROMER against the trivial router fixes, per chip, paired: calibrate_only (the
             percentile map), temperature_only (one scale per layer: the pooled percentile span
             ratio, no shift), shift_only (per-expert shift, no scale), replace_only and romer.
  plus       ROMER+ candidates against ROMER and its baselines (temperature_only, affine_columns: the
             periphery's per-column calibration), per chip, paired: romer_reprofiled (calibrate,
             re-profile, replace the experts still cold, recalibrate), router_digital
             (the clean router matrix kept digital), router_refit at each --alphas (each router
             refitted by ridge on the noisy hidden states to the clean logits, romer.methods.router_refit).
  methods    ROMER variants at the default noise: replacement strategy x tau, percentiles,
             calibration mode and layer-wise calibration; each against the same noisy seeds.

Noise seeds default to 1000-1004, disjoint from eval.seeds and calib.seeds (refused otherwise), so
that a choice made here is never made on the chips the evaluate stage reports.

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
from romer.pipeline.experiment import with_strength
from romer.core.io import write_json
from romer.pipeline.stages import compute_percentiles, evaluate_seed, method_specs, profile_routing
from romer.methods.replacement import make_plan
from romer.moe.routing import Recorder

from validation import add_validation_args, validation_experiment, validation_params


def with_params(exp, **sections):
    """exp.params with some keys replaced, e.g. replace={"tau": 0.5}."""
    upd = {k: getattr(exp.params, k).model_copy(update=v) for k, v in sections.items()}
    return exp.params.model_copy(update=upd)


def compare(rows: dict, reference: str = "romer") -> dict:
    """{method: [PPL per seed]} -> mean and CI per method, each method's paired reduction against
    noisy, and the reference method's against each other method (`<reference>_vs`, as eval.json's
    `romer_vs`: positive, the reference is better); prints them as a markdown table."""
    vs = f"{reference}_vs"
    out = {"ppl": {n: mean_ci(v) for n, v in rows.items()}, "reduction_vs_noisy": {}, vs: {}}
    for n, v in rows.items():
        if n != "noisy":
            red, ci = paired_reduction(rows["noisy"], v)
            out["reduction_vs_noisy"][n] = {"pct": red, "ci95": ci}
        if n not in (reference, "noisy"):
            red, ci = paired_reduction(v, rows[reference])
            out[vs][n] = {"pct": red, "ci95": ci}

    def cell(r):
        return f"{r['pct']:+.2f}% [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]" if r else "-"

    print(f"| method | PPL (mean over seeds) | reduction vs noisy, 95% CI | {reference} better by, 95% CI |")
    print("|---|---|---|---|")
    for n in rows:
        print(f"| {n} | {out['ppl'][n]['mean']:.3f} | {cell(out['reduction_vs_noisy'].get(n))} | "
              f"{cell(out[vs].get(n))} |")
    return out


def baselines(exp, seeds, eval_w, calib_w, clean_rec) -> dict:
    """Per chip: noisy, calibrate_only, temperature_only, replace_only, romer
    (romer.pipeline.stages.evaluate_seed) and shift_only (the percentile map restricted to a shift), paired."""
    from romer.pipeline.stages import _pct_to_json, clean_percentiles, pct_from_json

    e = exp.params.eval
    pct = {"clean": _pct_to_json(clean_percentiles(exp, calib_w))}
    clean_pct = pct_from_json(pct["clean"])  # the targets evaluate_seed uses
    specs = {n: sp for n, sp in method_specs(("per_chip",)).items()
             if n in ("noisy", "calibrate_only", "temperature_only", "replace_only", "romer")}
    rows = {}
    for seed in seeds:
        got = evaluate_seed(exp, seed, eval_w, calib_w, None, pct, clean_rec, specs)
        for name, r in got.items():
            rows.setdefault(name, []).append(r["ppl"])
        for name, fit in (("shift_only", "shift"),):
            exp.set_state(seed)
            maps = exp.calibrate(calib_w, clean_pct, fit=fit)
            rows.setdefault(name, []).append(perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device,
                                                        exp.routing_plan(None, maps)))
        print(f"seed {seed}: " + ", ".join(f"{n} {v[-1]:.3f}" for n, v in rows.items()))
    return compare(rows)


def plus(exp, seeds, eval_w, calib_w, clean_rec, alphas) -> dict:
    """ROMER+ candidates on each chip, with ROMER and its baselines (romer.pipeline.stages.evaluate_seed)
    on the same chips, paired: romer_reprofiled, router_digital and the router refit at each alpha."""
    from romer.pipeline.stages import (_pct_to_json, chip_plan, clean_percentiles, clean_replaced, clean_router_targets,
                                       pct_from_json, router_plan)

    e = exp.params.eval
    pct = {"clean": _pct_to_json(clean_percentiles(exp, calib_w))}
    clean_pct = pct_from_json(pct["clean"])
    targets = clean_router_targets(exp, calib_w)
    specs = {k: v for k, v in method_specs(("per_chip",), columns=exp.periphery is not None).items()
             if k in ("noisy", "calibrate_only", "temperature_only", "affine_columns", "romer", "router_digital")}
    base = exp.params
    rows, seconds, replaced = {}, {}, {}
    for seed in seeds:
        got = evaluate_seed(exp, seed, eval_w, calib_w, None, pct, clean_rec, specs, router_targets=targets)
        for name, r in got.items():
            rows.setdefault(name, []).append(r["ppl"])
        replaced.setdefault("romer", []).append(got["romer"]["replaced"])
        # the paper's order done right: calibrate, re-profile, replace the experts still cold, recalibrate
        exp.set_state(seed)
        t1 = time.perf_counter()
        plan = chip_plan(exp, seed, calib_w, exp.calibrate(calib_w, clean_pct))
        exp.set_state(seed, plan)
        maps = exp.calibrate(calib_w, clean_replaced(clean_pct, plan), plan)
        seconds.setdefault("romer_reprofiled", []).append(time.perf_counter() - t1)
        rows.setdefault("romer_reprofiled", []).append(perplexity(exp.model, exp.adapter, eval_w, e.batch_size,
                                                                  exp.device, exp.routing_plan(plan, maps)))
        replaced.setdefault("romer_reprofiled", []).append(plan["replaced"])
        for a in alphas:  # ROMER+: the routers kept digital, refitted on this chip (romer.methods.router_refit)
            name = f"router_refit_a{a:g}"
            exp.params = with_params(exp, calibrate={"refit_alpha": a})
            exp.set_state(seed)
            t1 = time.perf_counter()
            routing = router_plan(exp, "refit", calib_w, targets)
            seconds.setdefault(name, []).append(time.perf_counter() - t1)
            rows.setdefault(name, []).append(perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device,
                                                        routing))
            exp.params = base
        print(f"seed {seed}: " + ", ".join(f"{n} {v[-1]:.3f}" for n, v in rows.items()))
    return {**compare(rows), "fit_seconds": {n: sum(v) / len(v) for n, v in seconds.items()}, "alphas": list(alphas),
            "replaced_per_chip": {n: sum(v) / len(v) for n, v in replaced.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_validation_args(ap)
    ap.add_argument("--parts", nargs="+", default=["scales", "parts", "limits", "baselines", "methods"])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    ap.add_argument("--scale", type=float, default=1.0, help="noise strength of the method ablation (default 1)")
    ap.add_argument("--strategies", nargs="+", default=["copy_router", "split", "average"])
    ap.add_argument("--taus", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--percentiles", type=float, nargs="+", default=[5, 95, 25, 75, 10, 90, 1, 99])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1e-4, 1e-2, 1.0],
                    help="ridge strengths of router_refit (part plus), relative to trace(X^T X) / H")
    ap.add_argument("--out", default="metrics/ablation.json")
    args = ap.parse_args(argv)

    t0 = time.time()
    params = validation_params(args)
    exp, eval_w, calib_w = validation_experiment(args, params)
    e = params.eval
    exp.set_state(None)
    clean_rec = Recorder(indices=True)
    clean_logits = Recorder(logits=True, indices=False) if {"limits"} & set(args.parts) else None
    clean = perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device, None, clean_rec)
    if clean_logits is not None:  # the clean router logits, batch by batch, for the full routing oracle
        perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device, None, clean_logits)
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
        # Each row is one analog kind with its noise and its periphery (the periphery runs only on
        # arrays that carry noise, so it cannot be isolated this way: kinds=[] is the clean model).
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

            # The gate weights are the family's own for the noisy logits, taken at the clean set: the
            # softmax over all experts, then (if the family does) renormalised over the k chosen.
            # Masking the other logits before the softmax instead would renormalise the weights of a
            # router that does not (OLMoE), and inflate the expert mass it passes on.
            from romer.moe.adapters import SoftmaxTopKAdapter

            if not isinstance(exp.adapter, SoftmaxTopKAdapter):
                raise SystemExit(f"error: the clean-set oracle is written for softmax top-k routers, not "
                                 f"{type(exp.adapter).__name__}")
            renorm = bool(getattr(exp.model.config, "norm_topk_prob", False))

            def make(layer):
                def post(weights, indices, logits):
                    idx = queues[layer][pos[layer]].long().to(logits.device)
                    pos[layer] += 1
                    w = torch.softmax(logits.float(), dim=-1).gather(1, idx)
                    if renorm:
                        w = w / w.sum(dim=-1, keepdim=True)
                    return w.to(weights.dtype), idx
                return LayerRouting(post=post)
            return {layer: make(layer) for layer in exp.layers}

        def clean_routing_plan():
            """Every router's logits replaced by the clean model's for the same tokens: the clean
            top-k sets and the clean gate weights, the bound of any router-only repair."""
            queues = {layer: list(clean_logits.logits[layer]) for layer in exp.layers}
            pos = {layer: 0 for layer in exp.layers}

            def make(layer):
                def transform(logits):
                    got = queues[layer][pos[layer]].to(logits.device, logits.dtype)
                    pos[layer] += 1
                    return got
                return LayerRouting(transform=transform)
            return {layer: make(layer) for layer in exp.layers}

        rows = {"noisy": [], "oracle_routing": [], "oracle_clean_routing": []}
        for seed in args.seeds:
            rows["noisy"].append(noisy_ppl(seed))
            for name, plan in (("oracle_routing", oracle_plan), ("oracle_clean_routing", clean_routing_plan)):
                exp.set_state(seed)  # same weights; restarts the periphery's noise stream as for noisy
                rows[name].append(perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device, plan()))
        out["limits"] = {k: mean_ci(v) for k, v in rows.items()}
        for name, what in (("oracle_routing", "clean top-k sets, noisy gate weights"),
                           ("oracle_clean_routing", "clean top-k sets and clean gate weights")):
            red, ci = paired_reduction(rows["noisy"], rows[name])
            out["limits"][f"{name}_reduction_pct"], out["limits"][f"{name}_reduction_ci95"] = red, ci
            print(f"{name} ({what}): PPL {out['limits'][name]['mean']:.2f} vs noisy "
                  f"{out['limits']['noisy']['mean']:.2f} (reduction {red:+.2f}%, 95% CI [{ci[0]:+.2f}, {ci[1]:+.2f}])")

    if "baselines" in args.parts:
        out["baselines"] = baselines(exp, args.seeds, eval_w, calib_w, clean_rec)

    if "plus" in args.parts:
        out["plus"] = plus(exp, args.seeds, eval_w, calib_w, clean_rec, args.alphas)

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
        # only the methods a replacement or calibration choice changes (the router methods do not)
        specs = {n: sp for n, sp in method_specs(("per_chip",)).items()
                 if n in ("noisy", "calibrate_only", "replace_only", "romer")}
        results = []
        for cfg in configs:
            t1 = time.time()
            exp.params = with_params(exp, replace={"tau": cfg["tau"], "strategy": cfg["strategy"]},
                         calibrate={"percentiles": cfg["percentiles"], "layerwise": cfg["layerwise"]})
            plan = make_plan(profile["noisy_load"], cfg["tau"], exp.params.replace.max_per_layer, cfg["strategy"])
            pct = compute_percentiles(exp, plan, calib_w)
            per_seed = {s: evaluate_seed(exp, s, eval_w, calib_w, plan, pct, clean_rec, specs) for s in args.seeds}
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
