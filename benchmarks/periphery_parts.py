"""Which part of the default periphery does the damage, on the VALIDATION split (chips disjoint
from eval.seeds).

The default regime (docs/noise.md section 8) runs every analog matmul through `aihwkit-io-default`:
a 7-bit DAC on abs-max scaled inputs, output noise 0.06, a 9-bit ADC bounded at 12 and iterative
bound management. Each row below keeps the default mapping (tile scaling, `range_crest`) and the
default device noise, and switches periphery components on one at a time; then rows keep the
periphery and make the weights exact (noise scales 0), so the periphery's damage alone shows; the
last rows read the chip 25 s after programming instead of a day, when drift has not yet shrunk the
conductances. `compensation_gain` is alpha w_max over its value for exact weights (the drift
compensation's gain, by which the periphery's output noise grows in real units), mean over the
arrays of the first chip.

  python benchmarks/periphery_parts.py --out benchmarks/results/periphery_parts.json
"""

from __future__ import annotations

import argparse
import time

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)
import torch

from romer.core.io import write_json
from romer.evaluation.measure import mean_ci, paired_reduction, perplexity
from romer.pipeline.experiment import Experiment

from validation import (add_validation_args, validation_experiment, validation_params,  # noqa: E402  (benchmarks/)
                        validation_set)

OFF = {"inp_res": 0.0, "out_res": 0.0, "out_bound": 0.0, "out_noise": 0.0, "bound_management": "none"}
EXACT = {"prog_scale": 0.0, "read_scale": 0.0, "drift_scale": 0.0}
# name: (periphery overrides of aihwkit-io-default, noise overrides)
PARTS = {
    "noisy weights, no periphery": (OFF, {}),
    "+ DAC only (7 bit, abs-max)": ({**OFF, "inp_res": 1 / 126}, {}),
    "+ ADC only (9 bit, bound 12, iterative bound management)": (
        {**OFF, "out_res": 1 / 510, "out_bound": 12.0, "bound_management": "iterative"}, {}),
    "+ output noise only (0.06)": ({**OFF, "out_noise": 0.06}, {}),
    "+ io-default without output noise": ({"out_noise": 0.0}, {}),
    "+ io-default without bound management": ({"bound_management": "none"}, {}),
    "+ io-default (the default)": ({}, {}),
    "exact weights, io-default periphery": ({}, EXACT),
    "exact weights, output noise only": ({**OFF, "out_noise": 0.06}, EXACT),
    "exact weights, io-default without output noise": ({"out_noise": 0.0}, EXACT),
    # the drift compensation's gain (1.63 after a day: `compensation_gain`) multiplies the output noise
    "exact weights, io-default, output noise 0.06 x 1.63": ({"out_noise": 0.06 * 1.63}, EXACT),
    "noisy weights read at 25 s, no periphery": (OFF, {"t_inference_s": 25.0}),
    "noisy weights read at 25 s, io-default": ({}, {"t_inference_s": 25.0}),
}
REFERENCE = "+ io-default (the default)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_validation_args(ap, max_tokens=32768)
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--out", default="benchmarks/results/periphery_parts.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    base = validation_params(args)
    e = base.eval
    out = {**validation_set(args), "rows": {}}
    per_seed = {}
    refs = {}

    def scales(exp):  # alpha * w_max of every analog array of the current state
        got = (exp.weights.scale(r.name) for r in exp.weights.records)
        return torch.cat([t.flatten() for t in got if t is not None])

    def reference(seed):  # the same with exact weights (no drift: alpha = 1)
        if seed not in refs:
            ex = Experiment(base.model_copy(update={"noise": base.noise.model_copy(update=EXACT)}))
            ex.set_state(seed)
            refs[seed] = scales(ex)
            ex.restore()
        return refs[seed]

    for name in args.parts:
        per, noise = PARTS[name]
        p = base.model_copy(update={
            "noise": base.noise.model_copy(update=noise),
            "cim": base.cim.model_copy(update={"periphery": base.cim.periphery.model_copy(update=per)})})
        exp, eval_w, _ = validation_experiment(args, p)
        if "clean_ppl" not in out:
            exp.set_state(None)
            out["clean_ppl"] = perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device)
            print(f"clean PPL on {args.dataset}: {out['clean_ppl']:.2f} ({eval_w.numel()} tokens)", flush=True)
        ppls, gain = [], None
        for seed in args.seeds:
            exp.set_state(seed)
            if gain is None:
                gain = float((scales(exp) / reference(seed)).mean())
            ppls.append(perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device))
        exp.restore()
        per_seed[name] = ppls
        st = mean_ci(ppls)
        out["rows"][name] = {"periphery": exp.periphery.cfg.to_dict() if exp.periphery is not None else "none",
                             "noise": p.noise.model_dump(), "ppl": st,
                             "x_clean": st["mean"] / out["clean_ppl"], "compensation_gain": gain}
        print(f"{name:60s} {st['mean']:7.2f} ({st['mean'] / out['clean_ppl']:.2f}x clean), gain {gain:.3f}  "
              f"[{time.time() - t0:.0f} s]", flush=True)
        del exp
    if REFERENCE in per_seed:  # how much lower than the default each row is, paired over the chips
        for name, ppls in per_seed.items():
            if name != REFERENCE:
                pct, ci = paired_reduction(per_seed[REFERENCE], ppls)
                out["rows"][name]["below_default_pct"] = {"mean": pct, "ci95": ci}
    out["seconds"] = time.time() - t0
    write_json(args.out, out)
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
