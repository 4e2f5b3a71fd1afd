"""How much a chip's noisy perplexity moves when its noisy weights change in the last bit only.

Per chip: the noisy state, its PPL; then half the analog weights (chosen at random) nudged by one
float32 ulp, the periphery's noise stream restarted (the same draws as the first pass), and the PPL
again. A change of the simulator that only rounds differently (the fused noise pass changed 53% of
the noisy weights by an ulp) moves every figure by about this much, and so does anything else of
that size: it is the resolution of a per-chip comparison. Validation split and chips 1000-1004.

  python benchmarks/last_bit_sensitivity.py --max-tokens 8192 --seeds 1000 1001 1002 \
      --out benchmarks/results/last_bit_sensitivity.json
"""

from __future__ import annotations

import argparse
import time

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)
import torch

from romer.core.io import write_json
from romer.evaluation.measure import perplexity

from validation import add_validation_args, validation_experiment, validation_params  # noqa: E402


@torch.no_grad()
def nudge_last_bits(records, seed: int):
    """Move a random half of every tensor's elements one ulp up (in place)."""
    g = torch.Generator().manual_seed(seed)
    for r in records:
        t = r.tensor
        up = torch.nextafter(t, torch.full_like(t, float("inf")))
        t.copy_(torch.where(torch.rand(t.shape, generator=g) < 0.5, up, t))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_validation_args(ap, max_tokens=8192)
    ap.add_argument("--periphery", default=None, help="cim.periphery.preset (default: params.yaml's)")
    ap.add_argument("--out", default="benchmarks/results/last_bit_sensitivity.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    params = validation_params(args)
    if args.periphery:
        params.cim.periphery.preset = args.periphery
    exp, eval_w, _ = validation_experiment(args, params)
    bs = params.eval.batch_size
    rows = []
    for seed in args.seeds:
        exp.set_state(seed)
        before = perplexity(exp.model, exp.adapter, eval_w, bs, exp.device, None, None)
        nudge_last_bits(exp.weights.records, seed)
        exp.restart_periphery()
        after = perplexity(exp.model, exp.adapter, eval_w, bs, exp.device, None, None)
        rows.append({"seed": seed, "ppl": before, "ppl_nudged": after, "change_pct": 100 * (after - before) / before})
        print(f"chip {seed}: noisy PPL {before:.3f}, last bits nudged {after:.3f} ({rows[-1]['change_pct']:+.2f}%)",
              flush=True)
    exp.restore()
    mean_abs = sum(abs(r["change_pct"]) for r in rows) / len(rows)
    out = {"dataset": args.dataset, "tokens": int(eval_w.numel()), "periphery": params.cim.periphery.preset,
           "chips": rows, "mean_abs_change_pct": mean_abs, "seconds": time.time() - t0}
    write_json(args.out, out)
    print(f"mean |change| {mean_abs:.2f}%; wrote {args.out}")


if __name__ == "__main__":
    main()
