"""Why the `expected` calibration (maps pooled over other chips) does not repair a new chip.

On each validation chip (noise seeds disjoint from eval.seeds and calib.seeds), the router-logit
percentiles of every expert are compared with the clean model's, all layers in one pass, before any
calibration: the midpoint shift d = mid(noisy) - mid(clean) and the log span ratio
r = log(span(noisy) / span(clean)) of the (p_lo, p_hi) pair. Over chips, each splits into a part
common to all chips (s, the mean over chips) and a chip-specific part (e, variance v).

An `expected` map averages the percentiles of K other chips (calib.seeds), so on a new chip it
leaves e_new - mean_K(e) behind: a residual variance v (1 + 1/K), against s^2 + v with no map at
all. It helps only where the common part is larger than the chip-specific one: s^2 > v / K.

  python benchmarks/expected_maps.py --out benchmarks/results/expected_maps.json
"""

from __future__ import annotations

import argparse

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)
import torch

from romer.core.io import write_json
from romer.core.numerics import set_determinism
from romer.core.params import load_params
from romer.pipeline.experiment import Experiment


def split(x: torch.Tensor) -> dict:
    """x [chips, experts] -> mean square of the common part and variance of the chip-specific one."""
    s = x.mean(0)
    e = x - s
    v = (e ** 2).sum(0) / (x.shape[0] - 1)
    return {"common_ms": float((s ** 2).mean()), "chip_var": float(v.mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001, 1002, 1003, 1004])
    ap.add_argument("--out", default="benchmarks/results/expected_maps.json")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    reserved = set(params.eval.seeds) | set(params.calib.seeds)
    if reserved & set(args.seeds):
        ap.error(f"seeds {sorted(reserved & set(args.seeds))} are eval.seeds or calib.seeds: use fresh chips")
    set_determinism(params.numerics.threads)
    exp = Experiment(params)
    w = exp.calib_windows()
    exp.set_state(None)
    clean = exp.logit_percentiles(w)
    mids, logr = {layer: [] for layer in clean}, {layer: [] for layer in clean}
    for seed in args.seeds:
        exp.set_state(seed)
        noisy = exp.logit_percentiles(w)
        for layer, c in clean.items():
            n = noisy[layer]
            mids[layer].append(n.mean(1) - c.mean(1))
            logr[layer].append(torch.log((n[:, 1] - n[:, 0]) / (c[:, 1] - c[:, 0])))
        print(f"chip {seed} done")
    exp.restore()
    K = len(params.calib.seeds)
    layers = {}
    for layer in clean:
        d, r = split(torch.stack(mids[layer])), split(torch.stack(logr[layer]))
        clean_span = float((clean[layer][:, 1] - clean[layer][:, 0]).mean())
        row = {"clean_span_mean": clean_span, "shift": d, "log_span_ratio": r}
        for name, q in (("shift", d), ("log_span_ratio", r)):
            row[name]["residual_none"] = q["common_ms"] + q["chip_var"]
            row[name]["residual_expected"] = q["chip_var"] * (1 + 1 / K)
        layers[str(layer)] = row
        print(f"layer {layer}: clean span {clean_span:.3f} | shift: common rms {d['common_ms'] ** 0.5:.4f}, "
              f"chip sd {d['chip_var'] ** 0.5:.4f} -> residual rms none {row['shift']['residual_none'] ** 0.5:.4f}, "
              f"expected(K={K}) {row['shift']['residual_expected'] ** 0.5:.4f} | log span: common rms "
              f"{r['common_ms'] ** 0.5:.4f}, chip sd {r['chip_var'] ** 0.5:.4f}")
    out = {"seeds": args.seeds, "calib_seeds_K": K, "percentiles": list(params.calibrate.percentiles),
           "layers": layers}
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
