"""Choose beyond.drift_scale: noisy PPL of the committed model against read time, at several noise
scales (the scale multiplies the spread of the drift exponent as well as the programming and read
noise), a few seeds each. The drift run is only a test of the method where the model neither
collapses within hours nor is untouched.

  python benchmarks/drift_scale.py --scales 1 2 3 5 --seeds 0 1
"""

import argparse
import json


import romer  # noqa: F401  (before torch: pins the CPU numerical modes)
from romer.evaluation.measure import perplexity
from romer.core.numerics import set_determinism
from romer.pipeline.experiment import Experiment
from romer.core.params import load_params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=float, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--times", type=float, nargs="+", default=[25, 3600, 86400, 2592000, 31536000])
    args = ap.parse_args(argv)
    params = load_params()
    set_determinism(params.numerics.threads)
    exp = Experiment(params)
    e = params.eval
    w = exp.windows(e.dataset, e.seq_len, max_tokens=e.max_tokens)
    exp.set_state(None)
    rows = {"clean": perplexity(exp.model, exp.adapter, w, e.batch_size, exp.device), "scales": {}}
    print(f"clean {rows['clean']:.2f}")
    for scale in args.scales:
        per_t = []
        for t in args.times:
            ppl = [0.0] * len(args.seeds)
            for i, s in enumerate(args.seeds):
                exp.set_state(s, scale=scale, t_inference_s=t)
                ppl[i] = perplexity(exp.model, exp.adapter, w, e.batch_size, exp.device)
            per_t.append(sum(ppl) / len(ppl))
        rows["scales"][f"{scale:g}"] = dict(zip([f"{t:g}" for t in args.times], per_t))
        print(f"scale {scale:g}: " + ", ".join(f"t={t:g}s {p:.2f}" for t, p in zip(args.times, per_t)), flush=True)
    exp.restore()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
