"""Beyond the paper: ROMER across noise strengths and over deployment time (drift).

Each point runs the whole method in memory on one loaded model: profile the routing under noise
on calibration data, make the replacement plan, record the clean percentiles, then evaluate the
noisy and the ROMER model (per-chip calibration) over the eval seeds.
"""

from __future__ import annotations

from romer.evaluation.measure import mean_ci, paired_reduction, perplexity, routing_report
from romer.moe.routing import Recorder
from romer.pipeline.experiment import with_strength
from romer.pipeline.stages import (_pct_to_json, chip_plan, clean_percentiles, clean_replaced, clean_router_targets,
                                   evaluate_seed, method_specs)


def _eval(exp, seed, eval_w, plan=None, maps=None, clean_rec=None, t=None):
    exp.set_state(seed, plan, t_inference_s=t)
    rec = Recorder(indices=True)
    ppl = perplexity(exp.model, exp.adapter, eval_w, exp.params.eval.batch_size, exp.device,
                     exp.routing_plan(plan, maps), rec)
    rep = routing_report(rec, exp.num_experts, exp.params.replace.tau, clean_rec)
    return ppl, rep["mean"]


def _calibrated(exp, seed, plan, calib_w, clean_pct, t=None):
    """Percentile maps of chip `seed` with its replacement `plan` programmed in, read at time t."""
    exp.set_state(seed, plan, t_inference_s=t)
    return exp.calibrate(calib_w, clean_replaced(clean_pct, plan) if plan else clean_pct, plan)


def _summary(per_seed: dict, names, seeds):
    out = {n: mean_ci([per_seed[s][n][0] for s in seeds]) for n in names}
    lb = {n: {k: sum(per_seed[s][n][1][k] for s in seeds) / len(seeds) for k in ("cv", "routing_agreement")}
          for n in names}
    return out, lb


SWEEP_METHODS = ("noisy", "temperature_only", "romer", "romer_plus")


def sweep_point(exp, calib_w, eval_w, clean_ppl, clean_rec, scale) -> dict:
    """Noisy, ROMER, ROMER+ and the temperature baseline's PPL (and load CV, routing agreement) at one
    noise strength (a multiplier of noise.prog_scale and noise.read_scale), ROMER paired against the
    temperature baseline. Each chip runs evaluate's own methods (evaluate_seed), a subset of them."""
    exp.params = with_strength(exp.params, scale)
    seeds = exp.params.eval.seeds
    pct = {"clean": _pct_to_json(clean_percentiles(exp, calib_w))}
    specs = {n: sp for n, sp in method_specs(analog=exp.analog_kinds).items() if n in SWEEP_METHODS}
    targets = clean_router_targets(exp, calib_w)
    per_seed, replaced = {}, []
    for s in seeds:
        res = evaluate_seed(exp, s, eval_w, calib_w, None, pct, clean_rec, specs, router_targets=targets)
        replaced.append(res["romer"]["replaced"])
        per_seed[s] = {n: (r["ppl"], r["routing"]["mean"]) for n, r in res.items()}
    exp.restore()
    ppl, lb = _summary(per_seed, SWEEP_METHODS, seeds)
    red, red_ci = paired_reduction(ppl["noisy"]["per_seed"], ppl["romer"]["per_seed"])
    vs_t, vs_t_ci = paired_reduction(ppl["temperature_only"]["per_seed"], ppl["romer"]["per_seed"])
    plus, plus_ci = paired_reduction(ppl["noisy"]["per_seed"], ppl["romer_plus"]["per_seed"])
    return {"scale": scale, "seeds": list(seeds), "replaced_experts_per_chip": sum(replaced) / len(replaced),
            "ppl": {"clean": clean_ppl, **ppl}, "ppl_reduction_pct": red, "ppl_reduction_ci95": red_ci,
            "romer_vs": {"temperature_only": {"pct": vs_t, "ci95": vs_t_ci}},
            "romer_plus_reduction_pct": plus, "romer_plus_reduction_ci95": plus_ci, "load_balance": lb}


def drift_curve(exp, calib_w, eval_w, clean_rec, times) -> dict:
    """Noisy and ROMER PPL at each read time t. ROMER's plan and its percentile maps are made once
    at t0 = noise.t_inference_s ("romer"), or the maps are re-calibrated at each t
    ("romer_recalibrated"). The same seed is the same chip: same programming noise and drift
    exponents, read at different times."""
    seeds = exp.params.eval.seeds
    t0 = exp.params.noise.t_inference_s
    clean_pct = clean_percentiles(exp, calib_w)
    maps_t0, plans = {}, {}
    for s in seeds:  # each chip is profiled, replaced and calibrated once, at t0
        plans[s] = chip_plan(exp, s, calib_w)
        maps_t0[s] = _calibrated(exp, s, plans[s], calib_w, clean_pct, t0)
    rows = []
    for t in times:
        per_seed = {}
        for s in seeds:
            noisy = _eval(exp, s, eval_w, clean_rec=clean_rec, t=t)
            plan = plans[s]
            once = _eval(exp, s, eval_w, plan, maps_t0[s], clean_rec, t=t)
            maps_t = _calibrated(exp, s, plan, calib_w, clean_pct, t)
            recal = _eval(exp, s, eval_w, plan, maps_t, clean_rec, t=t)
            per_seed[s] = {"noisy": noisy, "romer": once, "romer_recalibrated": recal}
        ppl, lb = _summary(per_seed, ("noisy", "romer", "romer_recalibrated"), seeds)
        rows.append({"t_s": t, "ppl": ppl, "load_balance": lb})
    exp.restore()
    return {"t0_s": t0, "replaced_experts_per_chip": sum(p["replaced"] for p in plans.values()) / len(seeds),
            "points": rows}
