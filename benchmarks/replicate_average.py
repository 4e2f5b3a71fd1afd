"""ROMER+ candidate of issue 13: noise-guided replicate-and-average, on the VALIDATION split.

Each MoE layer frees the slots of its m least important experts and reprograms them with copies of
the m experts that the fitted noise model says lose the most; every token that picks such an expert
then uses the mean of the expert and its copy (two independent noise draws: half the programming
noise variance). This is replace.strategy `average` with another choice of slots and sources and a
budget of m per layer:

- importance of an expert (which slots are freed): its clean load on the calibration windows times
  the Frobenius norm of its clean weights (all parts);
- predicted loss (which experts are copied): clean load times the expert's relative weight error
  ||W_noisy - W||_F / ||W||_F, averaged over the calib.seeds chips (the noise model's prediction, not
  the evaluated chip);
- the copies' weights: with cim.variation off (the default) every array has the same noise law, so
  inverse-variance weights are equal weights; this script uses equal weights.

The plan is made once from the clean model and the noise model, the same for every chip. On each
chip (default --seeds 1000-1004, disjoint from eval.seeds and calib.seeds), paired:

  noisy, calibrate_only, romer_plus (router refit, romer.methods.router_refit)
  hetero_<pct>_attn_analog   m experts per layer kept digital (most sensitive), everything else analog
  drop_m<m>                  the m freed experts masked, nothing copied (the cost of freeing slots)
  ra_m<m>                    replicate-and-average
  ra_cal_m<m>                ... then the per-chip percentile calibration (ROMER's step 2)
  ra_refit_m<m>              ... then the router refit instead (ROMER+'s router with the replicas)

  python benchmarks/replicate_average.py --max-tokens 32768 --out benchmarks/results/replicate_average.json
"""

from __future__ import annotations

import argparse
import time

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)
import torch

from romer.core.io import write_json
from romer.evaluation.measure import perplexity, routing_report
from romer.methods.calibration import compose
from romer.methods.hetero import sensitive_experts
from romer.methods.replacement import pairs_by_layer, routing_fns
from romer.methods.router_refit import digital_router, ridge_router, router_inputs
from romer.moe.routing import LayerRouting, Recorder
from romer.pipeline.stages import clean_percentiles, clean_router_targets, router_plan

from ablation import compare  # noqa: E402  (benchmarks/ is the script's directory)
from validation import (MODELS, add_family_args, add_validation_args, family_out, validation_experiment,  # noqa: E402
                        validation_params)


def expert_stats(exp, calib_w, pred_seeds) -> dict:
    """{layer: {"load", "norm", "rel_err"}} per expert ([E] tensors): clean load on the calibration
    windows, clean weight norm, and relative weight error averaged over the `pred_seeds` chips."""
    E = exp.num_experts
    exp.set_state(None)
    rec = Recorder(indices=True)
    perplexity(exp.model, exp.adapter, calib_w, exp.params.calib.batch_size, exp.device, None, rec)
    rep = routing_report(rec, E, exp.params.replace.tau)
    sq = {layer: torch.zeros(E, dtype=torch.float64) for layer in exp.layers}
    err = {layer: torch.zeros(E, dtype=torch.float64) for layer in exp.layers}

    def per_expert(t, rec_):
        """[E] squared Frobenius norms of one record's tensor (fused [E, out, in], or one expert's)."""
        t = t.detach().double().cpu()
        out = torch.zeros(E, dtype=torch.float64)
        if rec_.fused:
            out += t.reshape(t.shape[0], -1).pow(2).sum(1)
        else:
            out[rec_.expert] += t.pow(2).sum()
        return out

    for r in exp._expert_records:
        sq[r.layer] += per_expert(exp.weights.clean(r.name), r)
    for s in pred_seeds:
        exp.set_state(s)
        for r in exp._expert_records:
            err[r.layer] += per_expert(r.tensor - exp.weights.clean(r.name).to(r.tensor.device), r)
    exp.restore()
    out = {}
    for layer in exp.layers:
        load = torch.tensor(rep["layers"][str(layer)]["load"], dtype=torch.float64)
        out[layer] = {"load": load, "norm": sq[layer].sqrt(), "rel_err": (err[layer] / len(pred_seeds) / sq[layer]).sqrt()}
    return out


def ra_plan(stats: dict, m: int) -> dict:
    """A replace.strategy `average` plan: per layer, the m least important slots hold copies of the m
    experts with the highest predicted loss (the highest-loss source on the least important slot)."""
    layers = {}
    for layer, st in stats.items():
        importance, loss = st["load"] * st["norm"], st["load"] * st["rel_err"]
        slots = [int(i) for i in torch.argsort(importance)[:m]]
        sources = [int(i) for i in torch.argsort(loss, descending=True) if int(i) not in slots][:m]
        layers[str(layer)] = [{"slot": s, "source": h, "slot_load": float(st["load"][s]),
                               "source_load": float(st["load"][h])} for s, h in zip(slots, sources)]
    return {"strategy": "average", "placement": "importance", "tau": None, "max_per_layer": m, "layers": layers,
            "replaced": sum(len(v) for v in layers.values())}


def drop_routing(exp, plan) -> dict:
    """The plan's slots masked out of routing, nothing copied."""
    return {layer: compose(mask=routing_fns(pairs, "average", exp.num_experts)[0])
            for layer, pairs in pairs_by_layer(plan).items()}


def refit_with_plan(exp, calib_w, targets, plan) -> dict:
    """romer.methods.router_refit.refit_routers with the plan's replica routing active: each layer's
    router inputs are taken with the earlier layers refitted and averaging their replicas."""
    fns = exp.replacement_fns(plan)
    routing = {}
    for b in exp.adapter.blocks(exp.model):
        x = router_inputs(exp.model, exp.adapter, calib_w, exp.params.calib.batch_size, exp.device, b.layer, routing)
        w, bias = ridge_router(x, targets["logits"][b.layer], targets["w"][b.layer], exp.params.calibrate.refit_alpha)
        mask, post = fns.get(b.layer, (None, None))
        routing[b.layer] = LayerRouting(logits_fn=digital_router(w, bias), transform=mask, post=post)
    exp.restart_periphery()
    return routing


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_validation_args(ap)
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16], help="experts freed and copied per layer")
    add_family_args(ap, "replicate_average")
    args = ap.parse_args(argv)
    family_out(args, "replicate_average")

    t0 = time.time()
    params = validation_params(args)
    exp, eval_w, calib_w = validation_experiment(args, params, model_dir=MODELS[args.family])
    e = params.eval
    E = exp.num_experts

    exp.set_state(None)
    clean = perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device)
    print(f"clean PPL on {args.dataset}: {clean:.3f} ({eval_w.numel()} tokens)")
    clean_pct = clean_percentiles(exp, calib_w)
    targets = clean_router_targets(exp, calib_w)
    stats = expert_stats(exp, calib_w, params.calib.seeds)
    plans = {m: ra_plan(stats, m) for m in args.budgets}
    exp.set_state(None)
    digital = {m: sensitive_experts(exp.adapter, exp.model, m / E) for m in args.budgets}

    def ppl(routing=None):
        exp.restart_periphery()  # every measurement of a chip sees the same periphery noise stream
        return perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device, routing)

    rows = {}
    for seed in args.seeds:
        def add(name, value):
            rows.setdefault(name, []).append(value)

        exp.set_state(seed)
        add("noisy", ppl())
        add("calibrate_only", ppl(exp.routing_plan(None, exp.calibrate(calib_w, clean_pct))))
        add("romer_plus", ppl(router_plan(exp, "refit", calib_w, targets)))
        for m in args.budgets:
            add(f"drop_m{m}", ppl(drop_routing(exp, plans[m])))
        for m in args.budgets:
            exp.set_state(seed, digital=digital[m])
            add(f"hetero_{100 * m / E:g}pct_attn_analog", ppl())
        for m in args.budgets:
            plan = plans[m]
            exp.set_state(seed, plan)
            add(f"ra_m{m}", ppl(exp.routing_plan(plan)))
            add(f"ra_cal_m{m}", ppl(exp.routing_plan(plan, exp.calibrate(calib_w, clean_pct, plan))))
            add(f"ra_refit_m{m}", ppl(refit_with_plan(exp, calib_w, targets, plan)))
        exp.restore()
        print(f"seed {seed} ({time.time() - t0:.0f} s): " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in rows.items()))
    # compare() reports every method against "romer"; here the reference is ROMER+ (the router refit)
    rows["romer"] = rows.pop("romer_plus")
    out = compare(rows)
    out = {"note": "'romer' in this file is romer_plus (the router refit), the reference of every romer_vs row",
           "family": args.family, "dataset": args.dataset, "tokens": int(eval_w.numel()), "seeds": args.seeds, "clean_ppl": clean,
           "prediction_seeds": list(params.calib.seeds), "budgets": args.budgets,
           "plans": {m: p["layers"] for m, p in plans.items()},
           "predicted_rel_err": {layer: st["rel_err"].tolist() for layer, st in stats.items()},
           **out, "seconds": time.time() - t0}
    write_json(args.out, out)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
