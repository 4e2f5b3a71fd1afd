"""Logic of the beyond-the-paper stages (beyond/dvc.yaml): noise-scale sweep points, their summary,
the drift curve, and the one-page report."""

from __future__ import annotations

import time
from pathlib import Path

from romer.core.errors import UserError
from romer.core.io import read_json, write_json
from romer.moe.routing import Recorder
from romer.pipeline.experiment import noise_label, with_strength

FAMILY_MODELS = Path("models/families")  # stages/family_model.py and beyond/dvc.yaml name the same path
SWEEP_DIR = Path("metrics/sweep")
SWEEP_JSON = "metrics/sweep.json"
DRIFT_JSON = "metrics/drift.json"
FAMILY_DIR = Path("metrics/families")
ARCH_JSON = "metrics/architectures.json"
FRAGILITY_JSON = "metrics/fragility.json"


def _setup(params, model_dir=None):
    from romer.core.paths import MODEL_DIR
    from romer.evaluation.measure import perplexity
    from romer.pipeline.experiment import Experiment

    exp = Experiment(params, model_dir=model_dir or MODEL_DIR)
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
    from romer.beyond.studies import sweep_point
    from romer.reporting.tracking import log_run

    t0 = time.time()
    exp, eval_w, calib_w, clean, clean_rec = _setup(params)
    out = sweep_point(exp, calib_w, eval_w, clean, clean_rec, scale)
    out.update(dataset=params.eval.dataset, noise=noise_label(params, scale))
    write_json(scale_file(scale), out)
    log_run(with_strength(params, scale), out, kind=f"sweep x{scale:g}", artifacts=[scale_file(scale)], started_at=t0)
    print(f"sweep x{scale:g}: noisy {out['ppl']['noisy']['mean']:.2f}, romer {out['ppl']['romer']['mean']:.2f} "
          f"({out['ppl_reduction_pct']:+.1f}%)")
    return out


def run_sweep(params):
    from romer.reporting.plots import plot_sweep

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
        "temperature_only": [p["ppl"]["temperature_only"]["mean"] for p in pts],
        "temperature_only_ci95": [p["ppl"]["temperature_only"]["ci95"] for p in pts],
        "romer_plus": [p["ppl"]["romer_plus"]["mean"] for p in pts],
        "romer_plus_ci95": [p["ppl"]["romer_plus"]["ci95"] for p in pts],
        "romer_plus_reduction_pct": [p["romer_plus_reduction_pct"] for p in pts],
        "romer_plus_reduction_ci95": [p["romer_plus_reduction_ci95"] for p in pts],
        "reduction_pct": [p["ppl_reduction_pct"] for p in pts],
        "reduction_ci95": [p["ppl_reduction_ci95"] for p in pts],
        # ROMER paired against the temperature baseline (positive: ROMER better)
        "romer_vs_temperature_pct": [p["romer_vs"]["temperature_only"]["pct"] for p in pts],
        "romer_vs_temperature_ci95": [p["romer_vs"]["temperature_only"]["ci95"] for p in pts],
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
    from romer.beyond.studies import drift_curve
    from romer.reporting.plots import plot_drift

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
        "noise": noise_label(params),
        "seeds": list(params.eval.seeds),
        "replaced_experts_per_chip": d["replaced_experts_per_chip"],
        "detail": d["points"],
    }
    write_json(DRIFT_JSON, out)
    plot_drift(out, "metrics/plots")
    return out


def run_report(params):
    from romer.reporting.report import write_report
    from romer.reporting.tracking import log_run

    path = write_report()
    ev = read_json("metrics/eval.json")
    log_run(params, ev, kind="report", artifacts=[path])
    return path


def run_family_eval(params, name):
    """Clean, noisy and ROMER PPL (and load CV) of family `name` at the default noise, as the sweep points."""
    from romer.beyond.studies import sweep_point
    from romer.evaluation.measure import routing_report
    from romer.moe.adapters import describe
    from romer.reporting.tracking import log_run

    model_dir = FAMILY_MODELS / name
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is missing: run the family_model stage for {name} (dvc repro beyond/dvc.yaml)")
    params.family_builtin(name)  # the family must still be in params
    t0 = time.time()
    p = params.model_copy(update={"model": params.model.model_copy(update={"source": str(model_dir)})})
    exp, eval_w, calib_w, clean, clean_rec = _setup(p, model_dir=model_dir)
    out = sweep_point(exp, calib_w, eval_w, clean, clean_rec, 1.0)
    out["clean_cv"] = routing_report(clean_rec, exp.num_experts, params.replace.tau)["mean"]["cv"]
    train = read_json(model_dir / "builtin_report.json")
    out.update(family=name, architecture=describe(exp.model), dataset=params.eval.dataset,
               noise=noise_label(params),
               training={k: train[k] for k in ("val_ppl", "test_ppl", "params", "active_params")},
               training_load_cv=train["summary"]["mean_cv"])
    write_json(FAMILY_DIR / f"{name}.json", out)
    log_run(p, out, kind=f"family {name}", artifacts=[FAMILY_DIR / f"{name}.json"], started_at=t0)
    print(f"family {name}: clean {clean:.2f}, noisy {out['ppl']['noisy']['mean']:.2f}, "
          f"romer {out['ppl']['romer']['mean']:.2f} ({out['ppl_reduction_pct']:+.1f}%)")
    return out


def _family_row(clean, noisy, romer, red, red_ci, cv, extra):
    return {"clean": clean, "noisy": noisy["mean"], "romer": romer["mean"], "noisy_ci95": noisy["ci95"],
            "romer_ci95": romer["ci95"], "reduction_pct": red, "reduction_ci95": red_ci,
            "cv_clean": cv["clean"], "cv_noisy": cv["noisy"], "cv_romer": cv["romer"], **extra}


def _routing_shape(model_dir=None) -> dict:
    """num_experts, top_k and MoE layers of the default model, from its config.json."""
    from romer.core.paths import MODEL_DIR

    f = Path(model_dir or MODEL_DIR) / "config.json"
    if not f.is_file():  # a hub or local model's pointer (source.json)
        return {}
    cfg = read_json(f)
    n = cfg.get("num_hidden_layers")
    return {"num_experts": cfg.get("num_experts", cfg.get("n_routed_experts")), "top_k": cfg.get("num_experts_per_tok"),
            "moe_layers": list(range(n)) if n else None}


def run_architectures(params):
    """metrics/architectures.json: {family: {clean, noisy, romer, ...}}, the default OLMoE model from
    metrics/eval.json and each beyond.families entry from metrics/families/<name>.json."""
    ev = read_json("metrics/eval.json")
    if ev["noise"] != noise_label(params):
        raise UserError("metrics/eval.json was made at other noise or cim settings: run `dvc repro` first")
    lb = ev["load_balance"]
    out = {"olmoe": _family_row(ev["ppl"]["clean"], ev["ppl"]["noisy"], ev["ppl"]["romer"], ev["ppl_reduction_pct"],
                                ev["ppl_reduction_ci95"], {k: lb[k]["cv"] for k in ("clean", "noisy", "romer")},
                                {"router": "softmax", "shared_experts": 0, **_routing_shape(),
                                 "source": "metrics/eval.json"})}
    for name in params.beyond.families:
        f = FAMILY_DIR / f"{name}.json"
        if not f.is_file():
            raise UserError(f"{f} is missing: run the family_eval stage for {name} (dvc repro beyond/dvc.yaml)")
        d = read_json(f)
        lbf = d["load_balance"]
        out[name] = _family_row(d["ppl"]["clean"], d["ppl"]["noisy"], d["ppl"]["romer"], d["ppl_reduction_pct"],
                                d["ppl_reduction_ci95"],
                                {"clean": d.get("clean_cv", float("nan")), "noisy": lbf["noisy"]["cv"],
                                 "romer": lbf["romer"]["cv"]},
                                {"router": d["architecture"]["router"],
                                 "shared_experts": d["architecture"]["shared_experts"],
                                 "num_experts": d["architecture"]["num_experts"], "top_k": d["architecture"]["top_k"],
                                 "moe_layers": d["architecture"]["moe_layers"], "source": str(f)})
    write_json(ARCH_JSON, out)
    return out


def run_fragility(params):
    """metrics/fragility.json: per MoE layer of the default model ("olmoe") and each beyond.families
    model, the weight kurtosis and row crest, the clean router margins and the fraction of tokens
    whose top-k set changes under the default noise (romer.moe.fragility), on the eval windows."""
    from romer.core.paths import MODEL_DIR
    from romer.moe.fragility import fragility_report
    from romer.pipeline.experiment import Experiment

    models = {"olmoe": Path(MODEL_DIR), **{name: FAMILY_MODELS / name for name in params.beyond.families}}
    out = {}
    for name, model_dir in models.items():
        if not (model_dir / "config.json").is_file():
            raise UserError(f"{model_dir} is missing: run `dvc repro` (default model) and the family_model stage "
                            f"for {name} (dvc repro beyond/dvc.yaml)")
        # The default model is models/model as fetch_model made it (checked against model.*); a family's
        # directory is loaded as a local model.
        p = params if model_dir == Path(MODEL_DIR) else \
            params.model_copy(update={"model": params.model.model_copy(update={"source": str(model_dir)})})
        exp = Experiment(p, model_dir=model_dir)
        e = params.eval
        w = exp.windows(e.dataset, e.seq_len, max_tokens=e.max_tokens, key="eval")
        out[name] = {"model": str(model_dir), **fragility_report(exp, w, e.seeds)}
        m = out[name]["mean"]
        print(f"fragility {name}: expert kurtosis {m['experts_kurtosis']:.2f}, row crest {m['experts_row_crest_median']:.2f}, "
              f"relative margin {m['margin_rel_median']:.3f}, top-k set changed {m['topk_changed_frac']:.3f}")
        del exp
    out["noise"] = noise_label(params)
    write_json(FRAGILITY_JSON, out)
    return out
