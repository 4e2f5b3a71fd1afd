"""Choose the default noise regime on the VALIDATION split, with noise seeds disjoint from eval.seeds.

For each candidate regime (noise source at scale 1, a periphery preset, a read time; optionally a
documented stress lever) it reports the noisy PPL of the builtin model against clean, and what a
reader needs to tell systematic from random damage: the LS gain of the analog weights after drift
compensation (w' regressed on w, pooled over all analog tensors) and their relative error.

  python benchmarks/default_regime.py --out benchmarks/results/default_regime.json

The chosen default and why: docs/noise.md ("The default regime").
"""

from __future__ import annotations

import argparse
import time

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)
import torch

from romer.core.io import write_json
from romer.core.numerics import set_determinism
from romer.core.params import load_params
from romer.evaluation.measure import mean_ci, perplexity
from romer.pipeline.experiment import Experiment

# name: (noise overrides, cim overrides, periphery preset)
REGIMES = {
    "1h, ideal periphery, row scaling": ({"t_inference_s": 3600}, {"weight_scaling": "row", "range_crest": None}, "ideal"),
    "1d, ideal periphery, row scaling": ({"t_inference_s": 86400}, {"weight_scaling": "row", "range_crest": None}, "ideal"),
    "1d, ideal periphery, tile scaling": ({"t_inference_s": 86400}, {"weight_scaling": "tile", "range_crest": None}, "ideal"),
    "1h, aihwkit-io-default": ({"t_inference_s": 3600}, {"range_crest": None}, "aihwkit-io-default"),
    "1d, aihwkit-io-default": ({"t_inference_s": 86400}, {"range_crest": None}, "aihwkit-io-default"),
    "1d, aihwkit-hwa": ({"t_inference_s": 86400}, {"range_crest": None}, "aihwkit-hwa"),
    "1y, aihwkit-io-default": ({"t_inference_s": 31536000}, {"range_crest": None}, "aihwkit-io-default"),
    "1d, aihwkit-io-default, crest 8": ({"t_inference_s": 86400}, {"range_crest": 8.0}, "aihwkit-io-default"),
    "1d, aihwkit-io-default, crest 12": ({"t_inference_s": 86400}, {"range_crest": 12.0}, "aihwkit-io-default"),
    "1d, aihwkit-io-default, crest 15": ({"t_inference_s": 86400}, {"range_crest": 15.0}, "aihwkit-io-default"),
    "1mo, aihwkit-io-default, crest 12": ({"t_inference_s": 2592000}, {"range_crest": 12.0}, "aihwkit-io-default"),
    "1d, aihwkit-io-default, crest 16": ({"t_inference_s": 86400}, {"range_crest": 16.0}, "aihwkit-io-default"),
    "1d, aihwkit-hwa, crest 12": ({"t_inference_s": 86400}, {"range_crest": 12.0}, "aihwkit-hwa"),
}


def weight_stats(exp) -> dict:
    """LS gain of w' on w and ||w' - w|| / ||w|| over all noisy analog tensors."""
    num = den = err = 0.0
    for rec in exp.weights.records:
        if exp.weights.scale(rec.name) is None:
            continue
        w = exp.weights.clean(rec.name).double()
        wn = rec.tensor.detach().double().cpu()
        num += float((wn * w).sum())
        den += float((w * w).sum())
        err += float(((wn - w) ** 2).sum())
    return {"gain": num / den, "rel_err": (err / den) ** 0.5}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="builtin-validation")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001, 1002])
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES))
    ap.add_argument("--out", default="benchmarks/results/default_regime.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    base = load_params()
    if set(args.seeds) & set(base.eval.seeds):
        raise SystemExit(f"--seeds must be disjoint from eval.seeds {base.eval.seeds}")
    set_determinism(base.numerics.threads)
    rows = []
    clean = None
    for name in args.regimes:
        noise, cim, preset = REGIMES[name]
        per = base.cim.periphery.model_copy(update={"preset": preset})
        p = base.model_copy(update={"noise": base.noise.model_copy(update=noise),
                                    "cim": base.cim.model_copy(update={**cim, "periphery": per})})
        exp = Experiment(p)
        e = p.eval
        eval_w = exp.windows(args.dataset, e.seq_len, max_tokens=args.max_tokens)
        if clean is None:
            exp.set_state(None)
            clean = perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device)
            print(f"clean PPL on {args.dataset}: {clean:.2f} ({eval_w.numel()} tokens)")
        ppls, stats = [], []
        for s in args.seeds:
            exp.set_state(s)
            stats.append(weight_stats(exp))
            ppls.append(perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device))
        exp.restore()
        st = mean_ci(ppls)
        row = {"regime": name, "noise": p.noise.model_dump(), "periphery": preset,
               "weight_scaling": exp.weights.weight_scaling, "noisy": st, "ratio_to_clean": st["mean"] / clean,
               "gain": sum(x["gain"] for x in stats) / len(stats),
               "weight_rel_err": sum(x["rel_err"] for x in stats) / len(stats)}
        rows.append(row)
        print(f"{name:40s} noisy {st['mean']:8.2f} ({row['ratio_to_clean']:.2f}x clean)  gain {row['gain']:.3f}  "
              f"rel err {row['weight_rel_err']:.3f}")
        del exp
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    out = {"dataset": args.dataset, "seeds": args.seeds, "clean_ppl": clean, "rows": rows,
           "wall_s": round(time.time() - t0, 1)}
    write_json(args.out, out)


if __name__ == "__main__":
    main()
