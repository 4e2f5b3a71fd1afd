"""The logic of the profile, replace, percentiles and evaluate stages (the stage scripts are thin).

The paths of the stage outputs are in romer.core.paths, shared by the stages, tests and benchmarks.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from romer.core import numerics
from romer.core.io import write_json
from romer.core.paths import EVAL_JSON, MODEL_DIR, NOISE_MODEL, PERCENTILES_JSON, PLAN_JSON, PLOTS, PROFILE_JSON
from romer.core.provenance import provenance, versions
from romer.core.staleness import check_made_with, made_with, read_input
from romer.evaluation.measure import mean_ci, paired_reduction, perplexity, routing_report
from romer.methods.replacement import make_plan, pairs_by_layer
from romer.moe.routing import Recorder
from romer.reporting.summary import SUMMARY_JSON, headline


def _record_routing(exp, windows, plan=None, maps=None):
    rec = Recorder(indices=True)
    perplexity(exp.model, exp.adapter, windows, exp.params.calib.batch_size, exp.device,
               exp.routing_plan(plan, maps), rec)
    return rec


# ---- profile ------------------------------------------------------------------------------------
def run_profile(params, exp=None) -> dict:
    from romer.pipeline.experiment import Experiment, noise_label
    from romer.reporting.plots import plot_profile

    exp = exp or Experiment(params)
    out = profile_routing(exp, exp.calib_windows())
    write_json(PROFILE_JSON, out)
    plot_profile(out, PLOTS)
    return out


def profile_routing(exp, windows) -> dict:
    """Routing of the clean model and of each calib.seeds noise instance on the calibration windows."""
    params = exp.params
    tau = params.replace.tau
    exp.set_state(None)
    clean = _record_routing(exp, windows)
    out = {"tokens": int(windows.numel()), "num_experts": exp.num_experts, "top_k": exp.top_k,
           "tau": tau, "seeds": list(params.calib.seeds),
           "clean": routing_report(clean, exp.num_experts, tau), "noisy": {}}
    loads = []
    for seed in tqdm(params.calib.seeds, desc="profile: noisy instances"):
        exp.set_state(seed)
        rec = _record_routing(exp, windows)
        rep = routing_report(rec, exp.num_experts, tau, clean=clean)
        out["noisy"][str(seed)] = rep
        loads.append({k: torch.tensor(v["load"]) for k, v in rep["layers"].items()})
    exp.restore()
    out["noisy_load"] = {k: torch.stack([d[k] for d in loads]).mean(0).tolist() for k in loads[0]}
    keys = out["clean"]["mean"].keys()
    out["noisy_mean"] = {k: sum(out["noisy"][str(s)]["mean"][k] for s in params.calib.seeds) / len(loads)
                         for k in list(keys) + ["routing_agreement", "kl_clean_noisy"]}
    return out


# ---- replace ------------------------------------------------------------------------------------
def run_replace(params) -> dict:
    """The expected plan (from the load averaged over the calib.seeds instances), the plan each of
    those instances would make for itself, and the per-chip budget (mean fraction of experts
    replaced), which sizes the heterogeneous baseline."""
    profile = read_input(PROFILE_JSON, "profile")
    r = params.replace
    plan = make_plan(profile["noisy_load"], r.tau, r.max_per_layer, r.strategy)
    per_chip = {seed: plan_from_report(rep, r) for seed, rep in profile["noisy"].items()}
    n_slots = len(profile["noisy_load"]) * profile["num_experts"]
    plan["per_chip_replaced"] = {seed: p["replaced"] for seed, p in per_chip.items()}
    plan["budget_fraction"] = sum(plan["per_chip_replaced"].values()) / len(per_chip) / n_slots
    plan["per_chip_plans"] = {seed: p["layers"] for seed, p in per_chip.items()}
    write_json(PLAN_JSON, plan)
    return plan


# ---- percentiles --------------------------------------------------------------------------------
# what artifacts/percentiles.json is made from (its params in dvc.yaml but numerics and model.device*,
# which do not change the values); evaluate checks them
PERCENTILES_PARAMS = ("model.dtype", "noise.prog_scale", "noise.read_scale", "noise.drift_scale",
                      "noise.t_inference_s", "noise.drift_compensation", "cim", "calib",
                      "calibrate.percentiles", "calibrate.layerwise")


def _pct_to_json(p):
    return {str(k): v.tolist() for k, v in p.items()}


def _maps_to_json(m):
    return {str(k): {"a": a.tolist(), "b": b.tolist()} for k, (a, b) in m.items()}


def maps_from_json(d):
    return {int(k): (torch.tensor(v["a"], dtype=torch.float64), torch.tensor(v["b"], dtype=torch.float64))
            for k, v in d.items()}


def pct_from_json(d):
    return {int(k): torch.tensor(v, dtype=torch.float64) for k, v in d.items()}


def run_percentiles(params, exp=None) -> dict:
    """Clean percentiles (without and with the replacement plan) and the `expected` maps pooled over
    the calib.seeds instances. Per-chip maps depend on the evaluated instance, so `evaluate` makes them."""
    from romer.pipeline.experiment import Experiment

    exp = exp or Experiment(params)
    out = compute_percentiles(exp, read_input(PLAN_JSON, "replace"), exp.calib_windows())
    out["made_with"] = made_with(params, PERCENTILES_PARAMS)
    write_json(PERCENTILES_JSON, out)
    return out


def clean_replaced(clean_pct: dict, plan) -> dict:
    """Clean percentile targets of a replaced model: a copy_router replica's logits follow its
    source's router row, so its target is the source's; split/average replicas are masked anyway."""
    out = {k: v.clone() for k, v in clean_pct.items()}
    if plan and plan["strategy"] == "copy_router":
        for layer, pairs in pairs_by_layer(plan).items():
            for slot, src in pairs:
                out[layer][slot] = clean_pct[layer][src]
    return out


def clean_percentiles(exp, windows) -> dict:
    """Clean router-logit percentiles {layer: [E, 2]} on the calibration windows."""
    exp.set_state(None)
    clean = exp.logit_percentiles(windows)
    exp.restore()
    return clean


def compute_percentiles(exp, plan, windows) -> dict:
    params = exp.params
    clean = clean_percentiles(exp, windows)

    def instances(with_plan):
        return [lambda s=s: exp.set_state(s, with_plan) for s in params.calib.seeds]

    expected = {"calibrate_only": exp.calibrate(windows, clean, None, instances(None)),
                "romer": exp.calibrate(windows, clean_replaced(clean, plan), plan, instances(plan))}
    exp.restore()
    out = {"percentiles": list(params.calibrate.percentiles), "layerwise": params.calibrate.layerwise,
           "seeds": list(params.calib.seeds), "clean": _pct_to_json(clean),
           "expected": {k: _maps_to_json(v) for k, v in expected.items()}}
    return out


# ---- evaluate -----------------------------------------------------------------------------------
def method_specs(modes=("per_chip",), hetero=None, analog=(), columns=False):
    """{method name: spec}. A spec says which replacement plan is programmed in (None; "chip": made
    from this noise instance's own routing profile on calibration data; "expected": the replace
    stage's plan from other instances), which calibration runs (None, per_chip or expected) and how it
    is fitted (`fit`, default the percentile map), and for the heterogeneous baseline which analog
    kinds get noise and which experts stay digital. columns: add `affine_columns`, the digital
    per-column calibration of every analog matmul (needs a periphery). The matched-budget `hetero_digital` also runs with
    attention analog (`hetero_digital_attn_analog`): only then is its budget ROMER's, like for like."""
    plan_of = {"per_chip": "chip", "expected": "expected"}
    # Ordered so that methods sharing a weight state run back to back (one noise pass per state).
    specs = {"noisy": dict(plan=None, cal=None)}
    for mode in modes:
        specs["calibrate_only" if mode == modes[0] else f"calibrate_only_{mode}"] = dict(plan=None, cal=mode)
    # the trivial baseline ROMER's calibration must beat: one router temperature per layer, per chip
    specs["temperature_only"] = dict(plan=None, cal="per_chip", fit="temperature")
    if columns:  # ... and the periphery's own per-column calibration, which acts on every matmul
        specs["affine_columns"] = dict(plan=None, cal=None, columns=True)
    # the routers kept digital with their clean matrices (a budget like ROMER's rewrites), and
    # ROMER+: the routers kept digital and refitted per chip to the clean logits
    specs["router_digital"] = dict(plan=None, cal=None, router="digital")
    specs["romer_plus"] = dict(plan=None, cal=None, router="refit")
    specs["replace_only"] = dict(plan=plan_of[modes[0]], cal=None)
    for mode in modes:
        specs["romer" if mode == modes[0] else f"romer_{mode}"] = dict(plan=plan_of[mode], cal=mode)
    no_attn = [k for k in analog if k != "attention"]
    for name, digital in (hetero or {}).items():
        specs[name] = dict(plan=None, cal=None, kinds=no_attn, digital=digital)
        if name == "hetero_digital":
            specs["hetero_digital_attn_analog"] = dict(plan=None, cal=None, digital=digital)
            specs["hetero_digital_romer"] = dict(plan=plan_of[modes[0]], cal=modes[0], kinds=no_attn,
                                                 digital=digital)
    return specs


def plan_from_report(rep: dict, r, slot_noise=None) -> dict:
    """Replacement plan (ReplaceParams r) from one routing report's per-layer expert load."""
    return make_plan({k: v["load"] for k, v in rep["layers"].items()}, r.tau, r.max_per_layer, r.strategy,
                     slot_noise=slot_noise, placement=r.placement)


def chip_plan(exp, seed, calib_w, maps=None) -> dict:
    """Replacement plan of one chip: its own expert load on the calibration data under its noise
    (routed through the logit `maps` where given: the experts still cold after calibration)."""
    exp.set_state(seed)
    noise = exp.expert_array_noise(seed) if exp.params.replace.placement == "least_noisy" else None
    rec = _record_routing(exp, calib_w, maps=maps)
    exp.restart_periphery()
    return plan_from_report(routing_report(rec, exp.num_experts, exp.params.replace.tau), exp.params.replace,
                            slot_noise=noise)


def clean_router_targets(exp, calib_w) -> dict:
    """What the router methods need from the clean model: its router matrices and its router logits
    on the calibration windows (romer.methods.router_refit)."""
    from romer.methods.calibration import collect_logits
    from romer.methods.router_refit import clean_routers

    exp.set_state(None)
    return {"w": clean_routers(exp.model, exp.adapter),
            "logits": collect_logits(exp.model, exp.adapter, calib_w, exp.params.calib.batch_size, exp.device)}


def router_plan(exp, kind, calib_w, targets) -> dict:
    """The routing plan of a router method in the current noisy state: `digital` (clean matrices) or
    `refit` (ridge refit on this chip, calibrate.refit_alpha)."""
    from romer.methods.router_refit import clean_router_plan, refit_routers

    if kind == "digital":
        return clean_router_plan(targets["w"])
    plan = refit_routers(exp.model, exp.adapter, calib_w, exp.params.calib.batch_size, exp.device,
                         targets["logits"], targets["w"], exp.params.calibrate.refit_alpha)
    exp.restart_periphery()
    return plan


def evaluate_seed(exp, seed, eval_w, calib_w, plan, pct, clean_rec, specs=None, modes=("per_chip",), bar=None,
                  router_targets=None):
    """PPL and routing report of each method on one noise instance. Raises on any failure.

    plan: the replace stage's (expected) plan; the per-chip plan is made here when a method needs it.
    router_targets: clean_router_targets, needed by the router methods (computed here if missing).
    bar: a tqdm bar over (seed, method) pairs, advanced after each method with its tokens/s.
    """
    p = exp.params
    specs = specs or method_specs(modes, analog=exp.analog_kinds)
    clean_pct = pct_from_json(pct["clean"])
    plans = {None: None, "expected": plan}
    if any(sp.get("router") for sp in specs.values()) and router_targets is None:
        router_targets = clean_router_targets(exp, calib_w)
    if any(sp["plan"] == "chip" for sp in specs.values()):
        plans["chip"] = chip_plan(exp, seed, calib_w)
    res = {}
    for name, sp in specs.items():
        state_plan = plans[sp["plan"]]
        digital = sp.get("digital")
        if digital and state_plan:  # a replaced slot holds a copy, so it cannot also stay digital
            slots = pairs_by_layer(state_plan)
            digital = {l: [e for e in ex if e not in {s for s, _ in slots.get(l, [])}] for l, ex in digital.items()}
        exp.set_state(seed, state_plan, kinds=sp.get("kinds"), digital=digital)
        if sp.get("columns"):
            exp.fit_columns(calib_w)
        maps = None
        if sp["cal"] == "per_chip":
            target = clean_replaced(clean_pct, state_plan) if state_plan else clean_pct
            maps = exp.calibrate(calib_w, target, state_plan, fit=sp.get("fit", "percentile"))
        elif sp["cal"] == "expected":
            maps = maps_from_json(pct["expected"]["romer" if sp["plan"] else "calibrate_only"])
        routing = (router_plan(exp, sp["router"], calib_w, router_targets) if sp.get("router")
                   else exp.routing_plan(state_plan, maps))
        rec = Recorder(indices=True)
        t0 = time.perf_counter()
        ppl = perplexity(exp.model, exp.adapter, eval_w, p.eval.batch_size, exp.device, routing, rec)
        if bar is not None:
            bar.set_postfix(seed=seed, method=name, ppl=f"{ppl:.2f}",
                            tok_s=f"{eval_w.numel() / (time.perf_counter() - t0):.0f}", refresh=False)
            bar.update(1)
        res[name] = {"ppl": ppl, "replaced": state_plan["replaced"] if state_plan else 0,
                     "state": (state_plan, maps),  # reused by the zero-shot tasks
                     "routing": routing_report(rec, exp.num_experts, p.replace.tau, clean_rec,
                                               pairs_by_layer(state_plan) if state_plan else None)}
    return res


def hetero_budgets(exp, plan, fractions) -> dict:
    """Digital expert sets of the heterogeneous baseline: at ROMER's budget (the mean fraction of
    experts it rewrites per chip, as a count over the whole model) and at each fixed fraction of
    experts per layer."""
    from romer.methods.hetero import sensitive_experts

    exp.set_state(None)
    out = {}
    if plan.get("budget_fraction", 0) > 0:
        out["hetero_digital"] = sensitive_experts(exp.adapter, exp.model, plan["budget_fraction"], per_layer=False)
    for f in fractions:
        out[f"hetero_digital_{100 * f:g}pct".replace(".", "p")] = sensitive_experts(exp.adapter, exp.model, f)
    return out


def run_evaluate(params, exp=None, log_mlflow=True) -> dict:
    from romer.pipeline.experiment import Experiment, noise_label
    from romer.reporting.plots import plot_eval

    t0 = time.time()
    e = params.eval
    if e.tasks:
        from romer.evaluation.tasks import check_task_names

        check_task_names(e.tasks)  # fail before any model work
    plan = read_input(PLAN_JSON, "replace")
    pct = read_input(PERCENTILES_JSON, "percentiles")
    check_made_with(PERCENTILES_JSON, pct.get("made_with") or {"calibrate.percentiles": pct["percentiles"]},
                    params, "percentiles")
    exp = exp or Experiment(params)
    eval_w = exp.windows(e.dataset, e.seq_len, max_tokens=e.max_tokens, key="eval")
    calib_w = exp.calib_windows()
    mode = params.calibrate.mode
    modes = (mode, "expected" if mode == "per_chip" else "per_chip")

    exp.set_state(None)
    clean_rec = Recorder(indices=True)
    clean_ppl = perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device, None, clean_rec,
                           desc="evaluate: clean")
    clean_routing = routing_report(clean_rec, exp.num_experts, params.replace.tau)
    specs = method_specs(modes, hetero_budgets(exp, plan, e.hetero_fractions), exp.analog_kinds,
                         columns=exp.periphery is not None)
    targets = clean_router_targets(exp, calib_w)
    per_seed = {}
    with tqdm(total=len(e.seeds) * len(specs), desc="evaluate: seeds x methods", unit="method") as bar:
        for seed in e.seeds:
            per_seed[seed] = evaluate_seed(exp, seed, eval_w, calib_w, plan, pct, clean_rec, specs, bar=bar,
                                           router_targets=targets)
    exp.restore()

    names = list(per_seed[e.seeds[0]].keys())
    ppl = {"clean": clean_ppl}
    for n in names:
        ppl[n] = mean_ci([per_seed[s][n]["ppl"] for s in e.seeds])
    red, red_ci = paired_reduction(ppl["noisy"]["per_seed"], ppl["romer"]["per_seed"])

    def lb(reports):
        keys = ("cv", "maxvio", "entropy", "underactivated_frac", "routing_agreement", "kl_clean_noisy")
        return {k: sum(r["mean"][k] for r in reports) / len(reports) for k in keys if k in reports[0]["mean"]}

    load_balance = {"clean": {**lb([clean_routing]), "routing_agreement": 1.0, "kl_clean_noisy": 0.0}}
    cv_per_layer = {"clean": {k: v["cv"] for k, v in clean_routing["layers"].items()}}
    for n in names:
        reps = [per_seed[s][n]["routing"] for s in e.seeds]
        load_balance[n] = lb(reps)
        cv_per_layer[n] = {k: sum(r["layers"][k]["cv"] for r in reps) / len(reps) for k in reps[0]["layers"]}

    out = {
        "model": params.model.source,
        "dataset": e.dataset,
        "tokens": int(eval_w.numel()),
        "seq_len": e.seq_len,
        "seeds": list(e.seeds),
        "noise": noise_label(params),
        "method": {"tau": params.replace.tau, "strategy": params.replace.strategy,
                   "replaced_experts_expected_plan": plan["replaced"],
                   "replaced_experts_per_chip": mean_ci([per_seed[s]["romer"]["replaced"] for s in e.seeds])["mean"]
                   if mode == "per_chip" else plan["replaced"],
                   "budget_fraction": plan.get("budget_fraction", 0.0), "percentiles": list(params.calibrate.percentiles),
                   "mode": mode, "layerwise": params.calibrate.layerwise},
        "ppl": ppl,
        "ppl_reduction_pct": red,
        "ppl_reduction_ci95": red_ci,
        # ROMER against every other method, paired per chip (positive: ROMER has the lower PPL)
        "romer_vs": {n: dict(zip(("pct", "ci95"), paired_reduction(ppl[n]["per_seed"], ppl["romer"]["per_seed"])))
                     for n in names if n not in ("noisy", "romer")},
        "load_balance": load_balance,
        "cv_per_layer": cv_per_layer,
        "tasks": {},
    }
    if e.tasks:
        from romer.evaluation.tasks import evaluate_tasks

        out["tasks"] = evaluate_tasks(exp, e.tasks, {s: per_seed[s]["romer"]["state"] for s in e.seeds},
                                      limit=e.task_limit)
    exp.restore()
    # What the numbers were made from (identical across reruns of the same commit and environment).
    out["provenance"] = provenance(MODEL_DIR, NOISE_MODEL)
    out["versions"] = versions()
    out["numerics"] = numerics.modes()
    # Wall time goes to the log and MLflow, not eval.json, which must be identical across reruns.
    wall = time.time() - t0
    print(f"evaluate: {len(e.seeds)} seeds x {len(names)} methods in {wall:.0f} s")
    write_json(EVAL_JSON, out)
    write_json(SUMMARY_JSON, headline(out))
    made = [EVAL_JSON, SUMMARY_JSON, *plot_eval(out, PLOTS)]
    from romer.core.io import commit_outputs
    from romer.reporting.report import REPORT_MD, write_report

    commit_outputs()  # the report reads eval.json, noise_fit.json and profile.json back from metrics/
    write_report(REPORT_MD, beyond=False)
    if log_mlflow:
        from romer.reporting.tracking import log_run

        made.append(REPORT_MD)
        used = [NOISE_MODEL, PLAN_JSON, PROFILE_JSON, "metrics/noise_fit.json", f"{PLOTS}/profile_load.png",
                f"{PLOTS}/profile_heatmap.png", f"{PLOTS}/noise_fit.png"]
        log_run(params, out, extra_metrics={"wall_time_s": wall}, artifacts=made + used, started_at=t0)
    return out
