"""ROMER+ candidate of issue 13: output-referred router calibration, on the VALIDATION split.

The percentile map (ROMER's step 2) matches the noisy router logits to the clean ones at two
percentiles per expert, blind to what the routing does downstream. This candidate fits the same
per-expert affine logit map l' = a * l + b, plus one gain g on the layer's top-k weights, to what the
block should output: per chip, layer by layer (each layer with the earlier ones already fitted), on
the calibration windows,

    min_{a, b, g}  mean_t || g * sum_{e in topk(l'_t)} w_e(l'_t) y_e(x_t) + s(x_t) - o_t ||^2 / mean_t ||o_t||^2

where x_t is the noisy block input, y_e the noisy chip's expert e on it (through the periphery), s
the rest of the block (shared experts), w the family's own routing weights, and o_t the clean model's
block output on the same token. It is solved by L-BFGS (strong Wolfe) from the percentile map and
g = 1: 2E + 1 parameters per layer. The top-k selection is recomputed at every step but has no
gradient; the weights, through the softmax or sigmoid scores, do. Variants, per chip and paired:

  noisy, calibrated (the percentile map), temperature (one temperature per layer)
  gain_only     the percentile map, and only the gain g fitted (is it the mass alone?)
  output_cal    a, b and g fitted
  output_cal_local  the same, to the clean block on the noisy chip's own block inputs (this block's
                error only; the target above also holds the error of every layer before it)
  romer_plus    the router kept digital and refitted by ridge (romer.methods.router_refit)
  output_refit  the refitted digital router, then a, b and g fitted on its logits (from a = 1, b = 0)

Default --seeds 1000-1004 (disjoint from eval.seeds and calib.seeds), families OLMoE (the pipeline's
model) and DeepSeek-V3 (a renormalising sigmoid router; `make beyond` trains it).

  python benchmarks/output_calibration.py --out benchmarks/results/output_calibration.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)
import torch

from romer.core.io import write_json
from romer.evaluation.measure import perplexity
from romer.methods.calibration import affine_map, make_transform, percentiles
from romer.methods.router_refit import digital_router, ridge_router
from romer.moe.routing import LayerRouting, Recorder, StopForward, routed
from romer.pipeline.stages import clean_percentiles, clean_router_targets, router_plan

from ablation import compare  # noqa: E402  (benchmarks/ is the script's directory)
from validation import (MODELS, add_validation_args, validation_experiment, validation_params,  # noqa: E402
                        validation_set)

VARIANTS = {"gain_only": dict(refit=False, free=("g",)), "output_cal": dict(refit=False, free=("a", "b", "g")),
            "output_cal_local": dict(refit=False, free=("a", "b", "g"), local=True),
            "output_refit": dict(refit=True, free=("a", "b", "g"))}


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def block_inputs(exp, windows, layer, plan) -> list:
    """Inputs [B, S, H] of MoE block `layer`, one per batch of calibration windows, with `plan` active."""
    block = next(b for b in exp.blocks if b.layer == layer)
    bs, got = exp.params.calib.batch_size, []
    exp.restart_periphery()
    h = block.module.register_forward_pre_hook(lambda m, args: got.append(args[0].detach()))
    try:
        with torch.no_grad(), routed(exp.model, exp.adapter, plan, stop_after=layer):
            for i in range(0, windows.shape[0], bs):
                try:
                    exp.model(windows[i:i + bs].to(exp.device), use_cache=False)
                except StopForward:
                    pass
    finally:
        h.remove()
    return got


def clean_block_outputs(exp, windows) -> dict:
    """{layer: [T, H]} the clean model's MoE block outputs on the windows (call in the clean state)."""
    got = {b.layer: [] for b in exp.blocks}
    hooks = [b.module.register_forward_hook(lambda m, a, y, layer=b.layer: got[layer].append(
        _out(y).detach().reshape(-1, _out(y).shape[-1]).float().cpu())) for b in exp.blocks]
    bs = exp.params.calib.batch_size
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], bs):
                exp.model(windows[i:i + bs].to(exp.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {layer: torch.cat(v) for layer, v in got.items()}


def decompose(exp, block, xs, logits_fn=None):
    """(logits [T, E], Y [T, E, H], s [T, H]) of the block on its inputs xs in the current state: the
    router's logits (logits_fn's, if given), each routed expert's output alone, and the rest of the
    block (shared experts). Every call restarts the periphery stream, so the part outside the routed
    experts sees the same noise in every call and cancels in y_e = block(route to e) - block(no expert)."""
    E = exp.num_experts

    def forced(e):
        def post(w, idx, logits):
            if e is None:
                return torch.zeros_like(w[:, :1]), idx[:, :1]
            return torch.ones_like(w[:, :1]), torch.full_like(idx[:, :1], e)
        return {block.layer: LayerRouting(logits_fn=logits_fn, post=post)}

    def run(e, rec=None):
        outs = []
        with torch.no_grad(), routed(exp.model, exp.adapter, forced(e), rec):
            for x in xs:
                exp.restart_periphery()
                y = _out(block.module(x))
                outs.append(y.reshape(-1, y.shape[-1]).float().cpu())
        return torch.cat(outs)

    rec = Recorder(logits=True, indices=False)
    s = run(None, rec)
    Y = torch.empty(s.shape[0], E, s.shape[1])
    for e in range(E):
        Y[:, e] = run(e) - s
    return rec.cat_logits(block.layer), Y, s


def routed_output(adapter, router, logits, Y, s, a, b, g):
    w, idx = adapter.route(router, logits * a + b)
    picked = Y[torch.arange(Y.shape[0]).unsqueeze(1), idx]  # [T, k, H]
    return g * (w.float().unsqueeze(-1) * picked).sum(1) + s


def fit_layer(adapter, router, logits, Y, s, target, a0, b0, free, iters=100) -> dict:
    """L-BFGS of the objective above over the parameters in `free` (of a, b, g)."""
    a = a0.float().clone().requires_grad_("a" in free)
    b = b0.float().clone().requires_grad_("b" in free)
    log_g = torch.zeros((), requires_grad="g" in free)
    denom = target.pow(2).sum(-1).mean()

    def loss():
        return (routed_output(adapter, router, logits, Y, s, a, b, log_g.exp()) - target).pow(2).sum(-1).mean() / denom

    with torch.no_grad():
        start = float(loss())
        raw = float((routed_output(adapter, router, logits, Y, s, 1.0, 0.0, 1.0) - target).pow(2).sum(-1).mean() / denom)
    opt = torch.optim.LBFGS([p for p in (a, b, log_g) if p.requires_grad], lr=1, max_iter=iters,
                            history_size=20, line_search_fn="strong_wolfe")

    params = [a, b, log_g]
    best = [start, [p.detach().clone() for p in params]]

    def closure():
        opt.zero_grad()
        v = loss()
        v.backward()
        if float(v) < best[0]:  # every point the search evaluates, trial steps included
            best[0], best[1] = float(v), [p.detach().clone() for p in params]
        return v

    error = None
    try:
        opt.step(closure)
    except RuntimeError as exc:  # a line-search step too large for float32 (flat directions: measured on DeepSeek-V3)
        error = str(exc).splitlines()[0]
    with torch.no_grad():
        if error is not None or not torch.isfinite(loss()):  # then the best point the search saw (or the start)
            for p, v in zip(params, best[1]):
                p.copy_(v)
        end = float(loss())
    out = {"a": a.detach().double(), "b": b.detach().double(), "g": float(log_g.detach().exp()),
           "rel_err": {"raw": raw, "init": start, "fitted": end}}
    if error is not None:
        out["lbfgs_error"] = error
    return out


def gain_post(g):
    return lambda w, idx, logits: (w * g, idx)


def clean_block_on(exp, block, xs, seed) -> torch.Tensor:
    """[T, H] the clean block's outputs on the noisy chip's block inputs xs (then chip `seed` again)."""
    exp.set_state(None)
    try:
        with torch.no_grad():
            return torch.cat([_out(block.module(x)).reshape(-1, x.shape[-1]).float().cpu() for x in xs])
    finally:
        exp.set_state(seed)


def output_calibrate(exp, calib_w, clean_out, clean_pct, targets, refit, free, seed, local=False) -> tuple[dict, dict]:
    """(routing plan, per-layer fit report) of one variant on noisy chip `seed` (the current state).

    local: the target is the clean block on the same (noisy) inputs, so the fit answers for this
    block's own error only; otherwise the clean model's block output on the clean path, which also
    holds the error of every layer before it."""
    plan, report = {}, {}
    pcts = exp.params.calibrate.percentiles
    for block in exp.blocks:
        layer = block.layer
        xs = block_inputs(exp, calib_w, layer, plan)
        target = clean_block_on(exp, block, xs, seed) if local else clean_out[layer]
        logits_fn = None
        if refit:
            x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).float().cpu()
            w, bias = ridge_router(x, targets["logits"][layer], targets["w"][layer], exp.params.calibrate.refit_alpha)
            logits_fn = digital_router(w, bias)
        logits, Y, s = decompose(exp, block, xs, logits_fn)
        if refit:
            a0, b0 = torch.ones(exp.num_experts), torch.zeros(exp.num_experts)
        else:
            a0, b0 = affine_map(percentiles(logits, *pcts), clean_pct[layer])
        got = fit_layer(exp.adapter, block.router, logits, Y, s, target, a0, b0, free)
        plan[layer] = LayerRouting(logits_fn=logits_fn, transform=make_transform(got["a"], got["b"]),
                                   post=gain_post(got["g"]))
        report[layer] = {k: got[k] for k in ("g", "rel_err", "lbfgs_error") if k in got}
        del Y
    exp.restart_periphery()
    return plan, report


def run_family(exp, args, eval_w, calib_w, t0) -> dict:
    e = exp.params.eval

    def ppl(routing=None):
        exp.restart_periphery()  # every routing of a chip sees the same periphery noise stream
        return perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device, routing)

    exp.set_state(None)
    clean = ppl()
    clean_pct = clean_percentiles(exp, calib_w)
    targets = clean_router_targets(exp, calib_w)
    clean_out = clean_block_outputs(exp, calib_w)
    rows, fits = {}, {}
    for seed in args.seeds:
        exp.set_state(seed)
        got = {"noisy": ppl(),
               "calibrated": ppl(exp.routing_plan(None, exp.calibrate(calib_w, clean_pct))),
               "temperature": ppl(exp.routing_plan(None, exp.calibrate(calib_w, clean_pct, fit="temperature")))}
        for name in args.variants:
            if name == "output_refit":
                got["romer_plus"] = ppl(router_plan(exp, "refit", calib_w, targets))
            plan, rep = output_calibrate(exp, calib_w, clean_out, clean_pct, targets, seed=seed, **VARIANTS[name])
            got[name] = ppl(plan)
            fits.setdefault(name, {})[seed] = rep
        for k, v in got.items():
            rows.setdefault(k, []).append(v)
        print(f"seed {seed} ({time.time() - t0:.0f} s): " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()),
              flush=True)
    exp.restore()
    return {"clean_ppl": clean, **compare(rows, reference="calibrated"), "fits": fits}


def kept_families(path: str, header: dict, rerun) -> dict:
    """The families of an earlier result at `path` that this run does not redo, so that one family
    at a time can be added (a family takes ~50 min on 2 cores). Only from a run of the same
    validation set (dataset, seeds, tokens); otherwise nothing is kept."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if any(old.get(k) != v for k, v in header.items()):
        print(f"{path}: another validation set (dataset, seeds or tokens differ); its families are replaced")
        return {}
    fams = old.get("families", {})
    if len(fams) == 1 and "seconds" in old:  # written before per-family times: the run's time is its one family's
        next(iter(fams.values())).setdefault("seconds", old["seconds"])
    kept = {k: v for k, v in fams.items() if k not in rerun}
    if kept:
        print(f"{path}: keeping its results for {', '.join(kept)}")
    return kept


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["olmoe", "deepseek_v3"], choices=list(MODELS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_validation_args(ap, max_tokens=32768)
    ap.add_argument("--out", default="benchmarks/results/output_calibration.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    params = validation_params(args)
    out = {**validation_set(args), "families": {}}
    out["families"] = kept_families(args.out, validation_set(args), args.families)
    for fam in args.families:
        t_fam = time.time()
        exp, eval_w, calib_w = validation_experiment(args, params, model_dir=MODELS[fam])
        print(f"{fam}: {eval_w.numel()} validation tokens, {calib_w.numel()} calibration tokens", flush=True)
        out["families"][fam] = run_family(exp, args, eval_w, calib_w, t0)
        out["families"][fam]["seconds"] = time.time() - t_fam
        del exp
    out["seconds"] = sum(f.get("seconds", 0.0) for f in out["families"].values())
    write_json(args.out, out)
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
