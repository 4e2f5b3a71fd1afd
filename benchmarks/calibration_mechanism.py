"""Why percentile calibration helps some families and not others: split its effect into expert
selection and expert weights, and measure the top-k weight mass it restores. VALIDATION split.

For each noisy chip (default --seeds 1000-1004, disjoint from eval.seeds and calib.seeds), the
per-chip calibration maps are made as in `evaluate`; then these routings are evaluated, paired:

  noisy           no repair
  calibrated      the full percentile calibration (ROMER's step 2, calibrate_only)
  selection_only  experts chosen from the calibrated logits, weighted from the noisy ones
  weights_only    experts chosen from the noisy logits, weighted from the calibrated ones
  temperature     one router temperature per layer (temperature_only), fitted on the same statistics

Weights are computed as each family does: softmax over all experts (OLMoE, Qwen2-MoE, DeepSeek-MoE:
no renormalisation), or sigmoid scores renormalised over the top-k (DeepSeek-V3). For every routing
the mean top-k weight mass (sum of the k routing weights of a token, averaged over tokens and MoE
layers) is recorded next to the clean model's: the magnitude the noise takes away and a map gives back.

  python benchmarks/calibration_mechanism.py --out benchmarks/results/calibration_mechanism.json
"""

import argparse
import time

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)

from romer.core.io import write_json
from romer.evaluation.measure import mean_ci, paired_reduction, perplexity
from romer.methods.calibration import compose, make_transform
from romer.pipeline.stages import clean_percentiles

from validation import (MODELS, add_validation_args, validation_experiment, validation_params,  # noqa: E402
                        validation_set)

ROUTINGS = ("noisy", "calibrated", "selection_only", "weights_only", "temperature")


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


class Mass:
    """Accumulates the top-k weight mass (sum over the k weights) of every routed token."""

    def __init__(self):
        self.total, self.tokens = 0.0, 0

    def add(self, weights):
        self.total += float(weights.float().sum())
        self.tokens += weights.shape[0]

    def value(self):
        return self.total / max(self.tokens, 1)


def plan_for(exp, maps, part, mass):
    """A routing plan: `part` is None (maps applied to selection and weights, or no maps), "selection"
    or "weights" (the maps applied to that part only). Every layer's final weights go into `mass`."""
    plan = {}
    for block in exp.blocks:
        tr = make_transform(*maps[block.layer]) if maps else None

        def post(weights, indices, raw, router=block.router, tr=tr):
            if part == "selection":  # raw: the logits before any transform
                indices = exp.adapter.route(router, tr(raw))[1]
                weights = weights_at(exp.adapter, router, raw, indices)
            elif part == "weights":
                weights = weights_at(exp.adapter, router, tr(raw), indices)
            mass.add(weights)
            return weights, indices

        plan[block.layer] = compose(tr if part is None else None, None, post)
    return plan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(MODELS), choices=list(MODELS))
    add_validation_args(ap, max_tokens=32768)
    ap.add_argument("--out", default="benchmarks/results/calibration_mechanism.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    params = validation_params(args)
    e = params.eval
    out = {**validation_set(args), "families": {}}
    for fam in args.families:
        exp, ew, cw = validation_experiment(args, params, model_dir=MODELS[fam])

        def ppl(maps=None, part=None):
            mass = Mass()
            exp.restart_periphery()  # every routing of a chip sees the same periphery noise stream
            p = perplexity(exp.model, exp.adapter, ew, e.batch_size, exp.device, plan_for(exp, maps, part, mass))
            return p, mass.value()

        exp.set_state(None)
        clean, clean_mass = ppl()
        cp = clean_percentiles(exp, cw)
        rows = {k: [] for k in ROUTINGS}
        masses = {k: [] for k in ROUTINGS}
        for s in args.seeds:
            exp.set_state(s)
            maps = exp.calibrate(cw, cp, None)
            temp = exp.calibrate(cw, cp, None, fit="temperature")
            got = {"noisy": ppl(), "calibrated": ppl(maps), "selection_only": ppl(maps, "selection"),
                   "weights_only": ppl(maps, "weights"), "temperature": ppl(temp)}
            for k, (p, m) in got.items():
                rows[k].append(p)
                masses[k].append(m)
            print(f"{fam} seed {s} ({time.time() - t0:.0f} s): " +
                  ", ".join(f"{k} {p:.2f} (mass {m:.3f})" for k, (p, m) in got.items()), flush=True)
        exp.restore()
        fam_out = {"clean_ppl": clean, "clean_topk_mass": clean_mass, "ppl": {}, "topk_mass": {},
                   "reduction_vs_noisy": {}}
        for k in ROUTINGS:
            fam_out["ppl"][k] = mean_ci(rows[k])
            fam_out["topk_mass"][k] = sum(masses[k]) / len(masses[k])
            if k != "noisy":
                red, ci = paired_reduction(rows["noisy"], rows[k])
                fam_out["reduction_vs_noisy"][k] = {"pct": red, "ci95": ci}
        out["families"][fam] = fam_out

        def cell(k):
            r = fam_out["reduction_vs_noisy"].get(k)
            red = f", {r['pct']:+.2f}% [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]" if r else ""
            return f"{k} {fam_out['ppl'][k]['mean']:.2f} (mass {fam_out['topk_mass'][k]:.3f}{red})"

        print(f"| {fam} | clean {clean:.2f} (mass {clean_mass:.3f}) | " + " | ".join(map(cell, ROUTINGS)) + " |",
              flush=True)
    out["seconds"] = time.time() - t0
    write_json(args.out, out)
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
