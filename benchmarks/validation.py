"""What every method-choice benchmark shares: the validation split, noise seeds disjoint from the
ones `evaluate` reports, and the refusal of anything else (docs/ablation.md: choose on validation,
report on test)."""

from __future__ import annotations

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)

from romer.core.numerics import set_determinism
from romer.core.params import load_params
from romer.pipeline.experiment import Experiment

VALIDATION_SEEDS = [1000, 1001, 1002, 1003, 1004]


def add_validation_args(ap, max_tokens=None):
    """--dataset, --seeds and --max-tokens, with the validation defaults."""
    ap.add_argument("--dataset", default="builtin-validation")
    ap.add_argument("--seeds", type=int, nargs="+", default=VALIDATION_SEEDS)
    ap.add_argument("--max-tokens", type=int, default=max_tokens)


def validation_params(args):
    """params.yaml, after refusing seeds that are eval.seeds or calib.seeds and the test split;
    pins the thread count."""
    params = load_params()
    shared = sorted(set(args.seeds) & (set(params.eval.seeds) | set(params.calib.seeds)))
    if shared:
        raise SystemExit(f"error: --seeds {shared} are also eval.seeds or calib.seeds in params.yaml: choose "
                         f"on other chips than the ones evaluate reports (default --seeds 1000-1004)")
    if args.dataset == params.eval.dataset:
        raise SystemExit(f"error: --dataset {args.dataset} is eval.dataset: choose on validation, not test")
    set_determinism(params.numerics.threads)
    return params


def validation_experiment(args, params, **kwargs):
    """(exp, eval windows of args.dataset, calibration windows) for the pipeline's model (or kwargs')."""
    exp = Experiment(params, **kwargs)
    eval_w = exp.windows(args.dataset, params.eval.seq_len, max_tokens=args.max_tokens)
    return exp, eval_w, exp.calib_windows()
