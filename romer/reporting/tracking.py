"""MLflow logging of an evaluation run.

One run per `evaluate`: the flattened params.yaml as params, eval.json flattened with dots as metrics
(`ppl.romer.mean`), the noise model, plots and replacement plan as artifacts, and tags: model, noise
source, dataset, eval.json's provenance (sha256 of the model and of the noise model), library versions
as `version.<lib>`, numerical modes as `numerics.<key>`, and the checkout's git commit and git_dirty.
If MLflow cannot be reached the stage still succeeds (its DVC metrics are written first); it warns
once and `romer mlflow-log` logs the committed metrics later.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

from romer.core.errors import UserError
from romer.core.params import flatten, load_params
from romer.core.provenance import git_commit, git_dirty, provenance, versions  # noqa: F401 (re-exported)

ARTIFACTS = ["noise/noise_model.json", "metrics/replacement_plan.json", "metrics/noise_fit.json",
             "metrics/profile.json", "metrics/plots", "metrics/report.md"]


def metrics_from_eval(ev: dict) -> dict:
    """Numeric leaves of eval.json, flattened with dots; [lo, hi] pairs become .lo/.hi, per-seed
    lists become .seed<N>."""
    out = {}

    def walk(prefix, v):
        if isinstance(v, bool):
            return
        if isinstance(v, (int, float)):
            out[prefix] = float(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            if prefix.endswith("ci95") and len(v) == 2:
                walk(prefix + ".lo", v[0])
                walk(prefix + ".hi", v[1])
            elif prefix.endswith("per_seed"):
                for s, x in zip(ev.get("seeds", range(len(v))), v):
                    walk(f"{prefix}.seed{s}", x)

    for key in ("ppl", "ppl_reduction_pct", "ppl_reduction_ci95", "load_balance", "tasks", "tokens"):
        if key in ev:
            walk(key, ev[key])
    return out


def provenance_tags(ev: dict) -> dict:
    """MLflow tags of a run: eval.json's `provenance` and `versions` (what the run was made from; also when
    `romer mlflow-log` logs it later), or, for an eval.json without them, the current checkout's."""
    prov = (ev.get("provenance") or provenance()) | {"git_commit": git_commit(), "git_dirty": git_dirty()}
    vers = ev.get("versions") or versions()
    tags = {k: "unknown" if prov.get(k) is None else str(prov[k])
            for k in ("git_commit", "git_dirty", "model_sha256", "noise_model_sha256")}
    tags.update({f"version.{k}": "none" if v is None else str(v) for k, v in vers.items()})
    tags.update({f"numerics.{k}": str(v) for k, v in (ev.get("numerics") or {}).items()})
    return tags


def _check_reachable(uri: str):
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as e:
            raise ConnectionError(f"MLflow tracking server {uri} is not reachable ({type(e).__name__}: {e})")


def log_run(params, ev: dict, extra_metrics=None, strict=False, run_name=None, extra_artifacts=()) -> str | None:
    """Log one run; returns its id. With strict=False a failure warns once and returns None."""
    cfg = params.mlflow
    if not cfg.enabled:
        return None
    try:
        _check_reachable(cfg.tracking_uri)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking_uri)
        mlflow.set_experiment(cfg.experiment)
        n = params.noise
        name = run_name or (f"{params.model.source}|{n.source}|p{n.prog_scale:g} r{n.read_scale:g} d{n.drift_scale:g}"
                            f"|{params.cim.periphery.preset}|t={n.t_inference_s:g}s")
        with mlflow.start_run(run_name=name) as run:
            flat = {k: ("null" if v is None else v) for k, v in flatten(params.model_dump(mode="json")).items()}
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
            metrics = metrics_from_eval(ev)
            metrics.update(extra_metrics or {})
            mlflow.log_metrics(metrics)
            mlflow.set_tags(provenance_tags(ev) | {"model": params.model.source, "noise_source": params.noise.source,
                                                   "dataset": ev.get("dataset", "")})
            for a in list(ARTIFACTS) + list(extra_artifacts):
                p = Path(a)
                if p.is_dir():
                    mlflow.log_artifacts(str(p), artifact_path=p.name)
                elif p.is_file():
                    mlflow.log_artifact(str(p))
            return run.info.run_id
    except Exception as e:
        if strict:
            raise UserError(f"cannot log to MLflow at {cfg.tracking_uri}: {type(e).__name__}: {e}") from None
        print(
            f"warning: MLflow logging to {cfg.tracking_uri} failed ({type(e).__name__}: {str(e)[:200]}). "
            f"The DVC metrics were written; log them later with `romer mlflow-log` once MLflow is reachable.",
            file=sys.stderr,
        )
        return None


def log_committed_metrics(params_path="params.yaml", eval_json="metrics/eval.json") -> str:
    """`romer mlflow-log`: log the metrics of a finished run (metrics/eval.json) after the fact."""
    import json

    params = load_params(params_path)
    p = Path(eval_json)
    if not p.is_file():
        raise UserError(f"{eval_json} not found: run `dvc repro` first")
    run_id = log_run(params, json.loads(p.read_text()), strict=True)
    print(f"logged run {run_id} to {params.mlflow.tracking_uri} (experiment '{params.mlflow.experiment}')")
    return run_id
