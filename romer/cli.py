"""The `romer` command line. Each subcommand imports its module lazily so `romer --help` is fast."""

from __future__ import annotations

import argparse
import json
import sys

from romer.core.errors import UserError


def _cmd_inspect(args):
    from romer.moe.adapters import describe
    from romer.moe.models import load_model

    model = load_model(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code)
    info = describe(model)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"family:          {info['family']}")
        print(f"MoE layers:      {len(info['moe_layers'])} {info['moe_layers']}")
        print(f"experts:         {info['num_experts']} routed, top-{info['top_k']}, router {info['router']}")
        print(f"shared experts:  {info['shared_experts']} per MoE block")
        print("analog-capable parameters:")
        for kind, n in info["analog_params"].items():
            print(f"  {kind:16s} {n:>14,d}")


def _cmd_fit_noise(args):
    from romer.cim.noise_fit import fit_noise_cli

    fit_noise_cli(args.csv, args.output, degree=args.degree, plot=args.plot)


def _cmd_noise_stats(args):
    from romer.cim.stats import noise_stats_cli

    noise_stats_cli(args)


def _cmd_presets(args):
    from romer.cim.noise_models import presets_cli

    presets_cli(as_json=args.json)


def _cmd_mlflow_log(args):
    from romer.reporting.tracking import log_committed_metrics

    log_committed_metrics(args.params, eval_json=args.eval_json, run_name=args.run_name,
                          tracking_uri=args.tracking_uri)


def build_parser():
    p = argparse.ArgumentParser(prog="romer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="describe the MoE structure of a model")
    s.add_argument("model", help="'builtin' (the trained embedded model in models/model, relative to the current "
                                 "directory: run from the repo root after `make repro`), a local directory, or a hub id")
    s.add_argument("--revision", default=None,
                   help="hub id: the commit hash or tag to load (required for a hub id); local directory: ignored")
    s.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repo's own Python code (DeepSeek-MoE needs it): only for repos you trust")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=_cmd_inspect)

    s = sub.add_parser("fit-noise", help="fit a CIM noise model from chip measurement CSVs")
    s.add_argument("csv", nargs="+", help="measurement CSV files or globs")
    s.add_argument("-o", "--output", required=True, help="output JSON")
    s.add_argument("--degree", type=int, default=2, help="degree of the sigma(g) polynomial")
    s.add_argument("--plot", default=None, help="write a PNG of the fit")
    s.set_defaults(fn=_cmd_fit_noise)

    s = sub.add_parser("noise-stats", help="what the simulated arrays do to a seeded N(0,1) matrix (docs/noise.md)")
    s.add_argument("--noise", required=True,
                   help="noise source: a preset (romer presets), a noise-model .json, measurement CSV(s)/glob, or 'none'")
    s.add_argument("--degree", type=int, default=2, help="sigma(g) polynomial degree when fitting CSVs")
    s.add_argument("--t-inference-s", type=float, default=25.0, help="read time after programming, s (default 25)")
    s.add_argument("--periphery", default=None, help="periphery preset: ideal, aihwkit-io-default, aihwkit-hwa")
    s.add_argument("--rows", type=int, default=512, help="matrix outputs (default 512)")
    s.add_argument("--cols", type=int, default=512, help="matrix inputs (default 512)")
    s.add_argument("--tile", default=None, help="array size ROWSxCOLS (inputs x outputs), e.g. 256x256 (default: one array)")
    s.add_argument("--weight-scaling", choices=["row", "tile"], default=None,
                   help="abs-max per output row or per array (default: the periphery preset's, else row)")
    s.add_argument("--range-crest", type=float, default=None,
                   help="full scale at max(abs-max, CREST * rms) of the scaled weights (default: abs-max)")
    s.add_argument("--prog-scale", type=float, default=1.0, help="programming-noise scale (default 1)")
    s.add_argument("--read-scale", type=float, default=1.0, help="read-noise scale (default 1)")
    s.add_argument("--drift-scale", type=float, default=1.0, help="drift-exponent scale (default 1)")
    s.add_argument("--no-drift-compensation", action="store_true", help="switch global drift compensation off")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=_cmd_noise_stats)

    s = sub.add_parser("presets", help="list the literature noise models")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_presets)

    s = sub.add_parser("mlflow-log", help="log the committed metrics of a finished run to MLflow")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--eval-json", default="metrics/eval.json", help="the eval.json to log (default: %(default)s)")
    s.add_argument("--run-name", default=None, help="MLflow run name (default: model|noise|scales|periphery|t)")
    s.add_argument("--tracking-uri", default=None, help="override mlflow.tracking_uri of the params file")
    s.set_defaults(fn=_cmd_mlflow_log)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
