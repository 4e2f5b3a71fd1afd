"""Logic of the beyond-the-paper stages (beyond/dvc.yaml): noise-scale sweep points, their summary,
the drift curve, and the one-page report."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .io import read_json, write_json
from .routing import Recorder

SWEEP_DIR = Path("metrics/sweep")
SWEEP_JSON = "metrics/sweep.json"
DRIFT_JSON = "metrics/drift.json"


def _setup(params):
    from .evaluation import perplexity
    from .experiment import Experiment

    exp = Experiment(params)
    e = params.eval
    eval_w = exp.windows(e.dataset, e.seq_len, max_tokens=e.max_tokens, key="eval")
    calib_w = exp.calib_windows()
    exp.set_state(None)
    clean_rec = Recorder(indices=True)
    clean = perplexity(exp.model, exp.adapter, eval_w, e.batch_size, exp.device, None, clean_rec)
    return exp, eval_w, calib_w, clean, clean_rec


def scale_file(scale) -> Path:
    return SWEEP_DIR / f"scale_{float(scale):g}.json"


def run_sweep_point(params, scale):
    from .beyond import sweep_point
    from .tracking import log_run

    exp, eval_w, calib_w, clean, clean_rec = _setup(params)
    out = sweep_point(exp, calib_w, eval_w, clean, clean_rec, scale)
    out.update(dataset=params.eval.dataset, noise={"source": params.noise.source, "scale": scale})
    write_json(scale_file(scale), out)
    p = params.model_copy(update={"noise": params.noise.model_copy(update={"scale": scale})})
    log_run(p, out, run_name=f"sweep x{scale:g}")
    print(f"sweep x{scale:g}: noisy {out['ppl']['noisy']['mean']:.2f}, romer {out['ppl']['romer']['mean']:.2f} "
          f"({out['ppl_reduction_pct']:+.1f}%)")
    return out


def run_sweep(params):
    from .plots import plot_sweep

    pts = []
    for s in params.beyond.scales:
        f = scale_file(s)
        if not f.is_file():
            raise UserError(f"{f} is missing: run the sweep_point stage for scale {s:g} (dvc repro beyond/dvc.yaml)")
        pts.append(read_json(f))
    out = {
        "scale": [p["scale"] for p in pts],
        "clean": pts[0]["ppl"]["clean"],
        "noisy": [p["ppl"]["noisy"]["mean"] for p in pts],
        "romer": [p["ppl"]["romer"]["mean"] for p in pts],
        "noisy_ci95": [p["ppl"]["noisy"]["ci95"] for p in pts],
        "romer_ci95": [p["ppl"]["romer"]["ci95"] for p in pts],
        "reduction_pct": [p["ppl_reduction_pct"] for p in pts],
        "reduction_ci95": [p["ppl_reduction_ci95"] for p in pts],
        "cv_noisy": [p["load_balance"]["noisy"]["cv"] for p in pts],
        "cv_romer": [p["load_balance"]["romer"]["cv"] for p in pts],
        "agreement_noisy": [p["load_balance"]["noisy"]["routing_agreement"] for p in pts],
        "agreement_romer": [p["load_balance"]["romer"]["routing_agreement"] for p in pts],
        "replaced_experts_per_chip": [p["replaced_experts_per_chip"] for p in pts],
        "seeds": pts[0]["seeds"],
    }
    write_json(SWEEP_JSON, out)
    plot_sweep(out, "metrics/plots")
    return out


def run_drift(params):
    from .beyond import drift_curve
    from .plots import plot_drift

    exp, eval_w, calib_w, clean, clean_rec = _setup(params)
    if not exp.noise_model.has_drift:
        raise UserError(f"noise model from '{params.noise.source}' has no drift (needs a t_s column with two or "
                        f"more read times per device, or a preset with drift such as pcm-joshi2020)")
    d = drift_curve(exp, calib_w, eval_w, clean_rec, params.beyond.drift_times_s)
    out = {
        "t_s": [p["t_s"] for p in d["points"]],
        "clean": clean,
        "noisy": [p["ppl"]["noisy"]["mean"] for p in d["points"]],
        "romer": [p["ppl"]["romer"]["mean"] for p in d["points"]],
        "romer_recalibrated": [p["ppl"]["romer_recalibrated"]["mean"] for p in d["points"]],
        "t0_s": d["t0_s"],
        "noise": {"source": params.noise.source, "scale": params.noise.scale,
                  "drift_compensation": params.noise.drift_compensation},
        "seeds": list(params.eval.seeds),
        "replaced_experts_per_chip": d["replaced_experts_per_chip"],
        "detail": d["points"],
    }
    write_json(DRIFT_JSON, out)
    plot_drift(out, "metrics/plots")
    return out


def run_report(params):
    from .report import write_report

    path = write_report()
    from .tracking import log_run

    ev = read_json("metrics/eval.json")
    log_run(params, ev, run_name="report", extra_artifacts=[path])
    return path
