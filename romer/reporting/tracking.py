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
import signal
import sys
import urllib.request
from contextlib import contextmanager
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


def check_tracking_uri(uri: str):
    """Refuse a sqlite URI that cannot work, at once and in one line (MLflow retries ~100 s on a sqlite
    path that is a directory). The URI's form is checked with params.yaml (romer.core.params)."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
    if path.is_dir():
        raise UserError(f"mlflow.tracking_uri {uri!r}: {path} is a directory; give a database file such as "
                        f"sqlite:///{path / 'mlflow.db'}")
    if str(path.parent) not in ("", ".") and not path.parent.is_dir():
        raise UserError(f"mlflow.tracking_uri {uri!r}: directory {path.parent} does not exist")


def _check_reachable(uri: str):
    check_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as e:
            raise ConnectionError(f"MLflow tracking server {uri} is not reachable ({type(e).__name__}: {e})")


class Terminated(BaseException):
    """SIGTERM, raised as an exception so that the run is ended (KILLED) instead of left RUNNING."""


@contextmanager
def _sigterm_raises():
    def handler(signum, frame):
        raise Terminated()

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def log_run(params, ev: dict, extra_metrics=None, strict=False, run_name=None, extra_artifacts=()) -> str | None:
    """Log one run; returns its id. With strict=False a failure warns once and returns None."""
    cfg = params.mlflow
    if not cfg.enabled:
        return None
    # The stage's outputs (eval.json, plots) go into place first: they are logged as artifacts, and an
    # interrupted or failed logging must not lose them.
    from romer.core.io import commit_outputs

    commit_outputs()
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
        run = mlflow.start_run(run_name=name)
        try:
            with _sigterm_raises():
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
        except (KeyboardInterrupt, Terminated):
            mlflow.end_run(status="KILLED")  # Ctrl-C or SIGTERM: the run says so, not RUNNING forever
            print(f"MLflow run {run.info.run_id} ended as KILLED (interrupted)", file=sys.stderr)
            raise SystemExit(143 if isinstance(sys.exc_info()[1], Terminated) else 130) from None
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
        mlflow.end_run()
        return run.info.run_id
    except UserError as e:
        if strict:
            raise
        print(f"warning: MLflow logging skipped: {e}. The DVC metrics were written.", file=sys.stderr)
        return None
    except Exception as e:
        if strict:
            raise UserError(f"cannot log to MLflow at {cfg.tracking_uri}: {type(e).__name__}: {e}") from None
        print(
            f"warning: MLflow logging to {cfg.tracking_uri} failed ({type(e).__name__}: {str(e)[:200]}). "
            f"The DVC metrics were written; log them later with `romer mlflow-log` once MLflow is reachable.",
            file=sys.stderr,
        )
        return None


def log_committed_metrics(params_path="params.yaml", eval_json="metrics/eval.json", run_name=None,
                          tracking_uri=None) -> str:
    """`romer mlflow-log`: log the metrics of a finished run (an eval.json) after the fact."""
    import json

    params = load_params(params_path)
    if tracking_uri:
        params.mlflow.tracking_uri = tracking_uri
    params.mlflow.enabled = True  # asked for explicitly
    p = Path(eval_json)
    if not p.is_file():
        raise UserError(f"{eval_json} not found: run `dvc repro` first")
    try:
        ev = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{eval_json}: not valid JSON ({e})") from None
    if not isinstance(ev, dict) or "ppl" not in ev:
        raise UserError(f"{eval_json}: not an eval.json (expected the `ppl` of the evaluate stage)")
    run_id = log_run(params, ev, strict=True, run_name=run_name)
    print(f"logged run {run_id} to {params.mlflow.tracking_uri} (experiment '{params.mlflow.experiment}')")
    return run_id
