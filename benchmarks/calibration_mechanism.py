"""Why percentile calibration helps some families and not others: split its effect into expert
selection and expert weights.

For each noisy chip (seed), the per-chip calibration maps are made as in `evaluate`; then three
routings are evaluated: the full calibration, "selection only" (experts chosen from the calibrated
logits, weighted from the noisy ones) and "weights only" (experts chosen from the noisy logits,
weighted from the calibrated ones). Weights are computed as each family does: softmax over all
experts (OLMoE, Qwen2-MoE: no renormalisation), or sigmoid scores renormalised over the top-k
(DeepSeek-V3).

  python benchmarks/calibration_mechanism.py --seeds 0 1
"""

import argparse
import json

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)

from romer.methods.calibration import compose, make_transform
from romer.evaluation.measure import perplexity
from romer.core.numerics import set_determinism
from romer.pipeline.experiment import Experiment
from romer.core.params import load_params
from romer.pipeline.stages import clean_percentiles

MODELS = {"olmoe": "models/model", "qwen2_moe": "models/families/qwen2_moe",
          "deepseek_v3": "models/families/deepseek_v3"}


def weights_at(adapter, router, logits, idx):
    """The family's top-k weights of the experts idx, from these logits."""
    if adapter.router_kind == "sigmoid":
        w = logits.sigmoid().gather(1, idx)
        if router.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * router.routed_scaling_factor
    p = logits.float().softmax(-1).gather(1, idx)
    if getattr(router, "norm_topk_prob", False):
        p = p / p.sum(-1, keepdim=True)
    return p.to(logits.dtype)


def split_plan(exp, maps, part):
    """A routing plan that applies the calibration to the selection only or to the weights only."""
    plan = {}
    for block in exp.blocks:
        a, b = maps[block.layer]
        tr = make_transform(a, b)

        def post(weights, indices, raw, router=block.router, tr=tr):
            cal = tr(raw)
            if part == "selection":
                idx = exp.adapter.route(router, cal)[1]
                return weights_at(exp.adapter, router, raw, idx), idx
            return weights_at(exp.adapter, router, cal, indices), indices

        plan[block.layer] = compose(None, None, post)
    return plan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(MODELS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    params = load_params()
    set_determinism(params.numerics.threads)
    e = params.eval
    out = {}
    for fam in args.families:
        exp = Experiment(params, model_dir=MODELS[fam])
        ew = exp.windows(e.dataset, e.seq_len, max_tokens=e.max_tokens)
        cw = exp.calib_windows()

        def ppl(plan=None):
            return perplexity(exp.model, exp.adapter, ew, e.batch_size, exp.device, plan)

        exp.set_state(None)
        clean = ppl()
        cp = clean_percentiles(exp, cw)
        rows = []
        for s in args.seeds:
            exp.set_state(s)
            maps = exp.calibrate(cw, cp, None)
            r = {"seed": s, "noisy": ppl(), "calibrated": ppl(exp.routing_plan(None, maps)),
                 "selection_only": ppl(split_plan(exp, maps, "selection")),
                 "weights_only": ppl(split_plan(exp, maps, "weights"))}
            rows.append(r)
            print(fam, {k: round(v, 2) for k, v in r.items()}, flush=True)
        exp.restore()
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("noisy", "calibrated", "selection_only", "weights_only")}
        out[fam] = {"clean": clean, **mean, "seeds": args.seeds}
        print(fam, "mean", {k: round(v, 2) for k, v in mean.items()}, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
