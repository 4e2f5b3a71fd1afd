"""MLflow logging of an evaluation run: one parent run, one child run per method.

The parent carries the flattened params.yaml as params, the headline (romer.reporting.summary) as
metrics, the methods table (`methods.json`, mlflow.log_table), the evaluation text and chip CSVs as
inputs with their hashes, the artifacts this run made, and tags: model, noise source, dataset,
eval.json's provenance (sha256 of the model and of the noise model), library versions as
`version.<lib>`, numerical modes as `numerics.<key>`, the git commit and git_dirty, and the DVC
experiment. Each child has a `method` tag and the same metric keys (summary.METHOD_KEYS and the
task accuracies), with per-seed PPL and per-layer load CV as steps, so MLflow's chart view and
Compare line the methods up. The parent spans the stage's work (its start time is the stage's).

If MLflow cannot be reached the stage still succeeds (its DVC metrics are written first); it warns
once and `romer mlflow-log` logs the committed metrics later.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from romer.core.errors import UserError
from romer.core.params import flatten, load_params
from romer.core.provenance import git_commit, git_dirty, provenance, versions  # noqa: F401 (re-exported)

MAX_RUN_NAME = 250


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


def params_diff(params) -> dict:
    """Flattened params that differ from the defaults (params.yaml's values), mlflow.* left out."""
    from romer.core.params import Params

    ref = flatten(Params().model_dump(mode="json"))
    return {k: v for k, v in flatten(params.model_dump(mode="json")).items()
            if not k.startswith("mlflow.") and ref.get(k, object()) != v}


def _fmt(v) -> str:
    return "null" if v is None else (f"{v:g}" if isinstance(v, float) else str(v)).replace(" ", "")


def default_run_name(params, kind="evaluate", diff=None) -> str:
    """`<dvc exp>: <kind> <params that differ from the defaults>`: what sets this run apart, readable in
    the runs table (a run of the committed defaults is `evaluate defaults`). diff: params_diff(params)."""
    diff = params_diff(params) if diff is None else diff
    what = " ".join(f"{k}={_fmt(v)}" for k, v in diff.items()) or "defaults"
    exp = os.environ.get("DVC_EXP_NAME")
    name = f"{exp}: {kind} {what}" if exp else f"{kind} {what}"
    return name if len(name) <= MAX_RUN_NAME else name[:MAX_RUN_NAME - 3] + "..."


def run_inputs(params) -> list[tuple[str, Path, str]]:
    """(name, path, context) of the files a run read: the evaluation text and the chip CSVs."""
    from romer.cim.chip_data import expand_paths

    out = []
    ds = params.eval.dataset
    if ds.startswith("builtin-"):
        out.append((f"builtin corpus ({ds})", Path(params.builtin.corpus_dir), "evaluation"))
    elif Path(ds).is_file():
        out.append((Path(ds).name, Path(ds), "evaluation"))
    try:
        out += [(Path(f).name, Path(f), "noise_fit") for f in expand_paths(params.noise.source)]
    except UserError:
        pass  # a preset, not files
    return [x for x in out if x[1].exists()]


def _log_inputs(mlflow, inputs):
    import pandas as pd
    from mlflow.data.dataset_source_registry import get_registered_sources

    from romer.core.provenance import hash_dir, hash_file

    # MLflow registers its local-file source twice and then warns on every resolve: name it directly.
    LocalArtifactDatasetSource = next(c for c in get_registered_sources() if c.__name__ == "LocalArtifactDatasetSource")

    for name, path, context in inputs:
        sha = hash_dir(path) if path.is_dir() else hash_file(path)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        # One row that says which file and which version: the run's Datasets column, with its hash.
        ds = mlflow.data.from_pandas(pd.DataFrame({"path": [str(path)], "bytes": [str(size)], "sha256": [sha]}),
                                     source=LocalArtifactDatasetSource(str(path.resolve())), name=name,
                                     digest=sha[:16])
        mlflow.log_input(ds, context=context)


def _log_children(mlflow, parent_name, ev):
    from mlflow.entities import Metric

    from romer.reporting.summary import METHOD_KEYS, method_rows

    client = mlflow.MlflowClient()
    rows = method_rows(ev)
    for r in rows:
        with mlflow.start_run(run_name=f"{r['method']} | {parent_name}"[:MAX_RUN_NAME], nested=True,
                              tags={"method": r["method"]}) as child:
            # 4 decimals: what the runs table can show in a column (eval.json keeps the full values)
            mlflow.log_metrics({k: round(float(v), 4) for k, v in r.items()
                                if (k in METHOD_KEYS or k.startswith("task.")) and v is not None})
            now = int(time.time() * 1000)
            steps = [Metric("ppl_per_seed", float(v), now, int(seed)) for seed, v in r["per_seed"]]
            steps += [Metric("load_cv_per_layer", v, now, layer) for layer, v in r["per_layer"]]
            if steps:
                client.log_batch(child.info.run_id, metrics=steps)
    table = {k: [r.get(k) for r in rows] for k in ("method",) + METHOD_KEYS}
    mlflow.log_table(table, artifact_file="methods.json")


def _end_all(mlflow, status):
    while mlflow.active_run() is not None:
        mlflow.end_run(status=status)


def log_run(params, ev: dict, extra_metrics=None, strict=False, run_name=None, artifacts=(), started_at=None,
            inputs=None, kind="evaluate") -> str | None:
    """Log one parent run with a child per method; returns the parent's id. With strict=False a failure
    warns once and returns None.

    artifacts: the files this run made or used (nothing else is logged); started_at: time.time() at the
    start of the stage's work; inputs: (name, path, context) of the data it read (default: run_inputs).
    """
    cfg = params.mlflow
    if not cfg.enabled:
        return None
    # The stage's outputs (eval.json, plots) go into place first: they are logged as artifacts, and an
    # interrupted or failed logging must not lose them.
    from romer.core.io import commit_outputs
    from romer.reporting.summary import headline

    commit_outputs()
    try:
        _check_reachable(cfg.tracking_uri)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking_uri)
        exp = mlflow.set_experiment(cfg.experiment)
        diff = params_diff(params)
        name = run_name or default_run_name(params, kind, diff)
        tags = provenance_tags(ev) | {
            "model": params.model.source, "noise_source": params.noise.source, "dataset": ev.get("dataset", ""),
            "kind": kind, "dvc_experiment": os.environ.get("DVC_EXP_NAME", "none"),
            "mlflow.note.content": (f"{kind} of {params.model.source} under {params.noise.source} noise, "
                                    f"{len(ev.get('seeds') or [])} noise seeds, on {ev.get('dataset', '?')}. "
                                    f"Params that differ from params.yaml's defaults: "
                                    + (", ".join(f"{k}={_fmt(v)}" for k, v in diff.items()) or "none") + ".")}
        start = int((started_at or time.time()) * 1000)
        run = mlflow.MlflowClient().create_run(exp.experiment_id, start_time=start, tags=tags, run_name=name)
        mlflow.start_run(run_id=run.info.run_id)
        try:
            with _sigterm_raises():
                flat = {k: ("null" if v is None else v) for k, v in flatten(params.model_dump(mode="json")).items()}
                mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
                metrics = {k: float(v) for k, v in headline(ev).items() if isinstance(v, (int, float))
                           and not isinstance(v, bool)}
                metrics.update(extra_metrics or {})
                mlflow.log_metrics(metrics)
                _log_inputs(mlflow, run_inputs(params) if inputs is None else inputs)
                _log_children(mlflow, name, ev)
                for a in artifacts:
                    p = Path(a)
                    if p.is_file():
                        mlflow.log_artifact(str(p), artifact_path=str(p.parent) if str(p.parent) != "." else None)
        except (KeyboardInterrupt, Terminated):
            _end_all(mlflow, "KILLED")  # Ctrl-C or SIGTERM: the run says so, not RUNNING forever
            print(f"MLflow run {run.info.run_id} ended as KILLED (interrupted)", file=sys.stderr)
            raise SystemExit(143 if isinstance(sys.exc_info()[1], Terminated) else 130) from None
        except BaseException:
            _end_all(mlflow, "FAILED")
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
    arts = [p, p.parent / "summary.json"] if p.parent.name == "metrics" else [p]
    run_id = log_run(params, ev, strict=True, run_name=run_name, artifacts=arts)
    print(f"logged run {run_id} to {params.mlflow.tracking_uri} (experiment '{params.mlflow.experiment}')")
    return run_id
