"""What every method-choice benchmark shares: the validation split, noise seeds disjoint from the
ones `evaluate` reports, and the refusal of anything else (docs/ablation.md: choose on validation,
report on test)."""

from __future__ import annotations

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)

from romer.core.numerics import set_determinism
from romer.core.params import load_params
from romer.pipeline.experiment import Experiment

VALIDATION_SEEDS = [1000, 1001, 1002, 1003, 1004]
# Each family's model: the pipeline's (olmoe) and the ones `make beyond` trains.
MODELS = {"olmoe": "models/model", "qwen2_moe": "models/families/qwen2_moe",
          "deepseek_moe": "models/families/deepseek_moe", "deepseek_v3": "models/families/deepseek_v3"}


def add_validation_args(ap, max_tokens=None):
    """--dataset, --seeds and --max-tokens, with the validation defaults."""
    ap.add_argument("--dataset", default="builtin-validation")
    ap.add_argument("--seeds", type=int, nargs="+", default=VALIDATION_SEEDS)
    ap.add_argument("--max-tokens", type=int, default=max_tokens)
    ap.add_argument("--params", default="params.yaml",
                    help="another params file (a copy of params.yaml with other values): the same study in another regime")


def add_family_args(ap, name: str):
    """--family (one model of MODELS) and --out (default benchmarks/results/<name>.json for the
    pipeline's model, <name>_<family>.json for another); `family_out` fills the default in."""
    ap.add_argument("--family", default="olmoe", choices=list(MODELS),
                    help="olmoe: the pipeline's model; the others need `make beyond`")
    ap.add_argument("--out", default=None,
                    help=f"default benchmarks/results/{name}.json (olmoe), else {name}_<family>.json")


def family_out(args, name: str) -> str:
    if args.out is None:
        args.out = f"benchmarks/results/{name}{'' if args.family == 'olmoe' else '_' + args.family}.json"
    return args.out


def validation_set(args) -> dict:
    """What a result was measured on: the split, the chips and the tokens (a result is comparable
    only to one of the same set)."""
    return {"dataset": args.dataset, "seeds": args.seeds, "max_tokens": args.max_tokens}


def validation_params(args):
    """params.yaml (or --params), after refusing seeds that are eval.seeds or calib.seeds and the test split;
    pins the thread count."""
    params = load_params(args.params)
    shared = sorted(set(args.seeds) & (set(params.eval.seeds) | set(params.calib.seeds)))
    if shared:
        raise SystemExit(f"error: --seeds {shared} are also eval.seeds or calib.seeds in {args.params}: choose "
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
