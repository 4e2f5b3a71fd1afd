"""The noise pass at several block sizes (romer.cim.mapping.CPU_CHUNK_ELEMENTS), against its RNG floor.

A block's normals (6 per weight) are drawn into memory, then read back by the device chain; on a
CPU a block that stays nearer the cache should cost less. This measures it on a random model of a
benchmark shape (default: `wide`, 210 M analog weights), with the pipeline's fitted noise and
mapping: one warm-up round, then --repeats rounds that each run the pass once per block size, in
turn, and draw the same normals with torch alone (the RNG floor, eval_overhead.rng_floor). With --json the last line is one
JSON object.

  python benchmarks/noise_pass_blocks.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics

import romer  # noqa: F401,E402  (before torch: pins the CPU numerical modes)
import torch  # noqa: E402

import romer.cim.mapping as mapping  # noqa: E402
from eval_overhead import SHAPES, build_random, interleaved, rng_floor  # noqa: E402  (benchmarks/)
from romer.cim.sources import resolve_noise_model  # noqa: E402
from romer.core.params import ANALOG_KINDS  # noqa: E402
from romer.moe.adapters import analog_tensors, get_adapter  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="wide", choices=list(SHAPES))
    ap.add_argument("--blocks-log2", type=int, nargs="+", default=[26, 22, 20], help="block sizes, log2 weights")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--noise", default="data/chip/pcm_sample.csv")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    model = build_random(args.shape, "cpu", torch.float32)
    recs = analog_tensors(model, get_adapter(model), ANALOG_KINDS)
    weights = mapping.AnalogWeights(recs, resolve_noise_model(args.noise, 2), tile=(512, 512),
                                    weight_scaling="tile", range_crest=12.0)
    n_normals = 6 * sum(r.tensor.numel() for r in recs)
    gen = torch.Generator().manual_seed(0)

    def at(k):
        def run():
            mapping.CPU_CHUNK_ELEMENTS = 1 << k
            weights.apply(seed=1, t_inference_s=86400.0)
        return run

    default = mapping.CPU_CHUNK_ELEMENTS
    fns = {f"2^{k}": at(k) for k in args.blocks_log2}
    fns["rng_floor"] = rng_floor(n_normals, gen, "cpu")
    try:
        times = interleaved(fns, "cpu", args.repeats)
    finally:
        mapping.CPU_CHUNK_ELEMENTS = default
    floor = statistics.median(times["rng_floor"])
    res = {
        "shape": args.shape,
        "analog_params": sum(r.tensor.numel() for r in recs),
        "largest_tensor": max(r.tensor.numel() for r in recs),
        "torch": torch.__version__,
        "rounds": args.repeats,
        "rng_floor_s": floor,
        "noise_pass_s": {k: statistics.median(v) for k, v in times.items() if k != "rng_floor"},
        "noise_pass_vs_rng_floor": {k: statistics.median(a / b for a, b in zip(v, times["rng_floor"]))
                                    for k, v in times.items() if k != "rng_floor"},
        "default_block": f"2^{default.bit_length() - 1}",
    }
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res["noise_pass_s"].items():
            print(f"block {k:>5}: {v:.2f} s, {res['noise_pass_vs_rng_floor'][k]:.2f}x the RNG floor ({floor:.2f} s)")
    return res


if __name__ == "__main__":
    main()
