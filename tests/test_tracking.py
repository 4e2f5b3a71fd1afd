"""MLflow logging of an evaluation run (romer.reporting.tracking), against a real local `mlflow server`."""

import json
import os
import signal
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from romer.cli import main as cli_main
from romer.core.params import Params, flatten
from romer.reporting.mlflow_server import free_port, mlflow_server
from romer.reporting.summary import METHOD_KEYS, headline, method_rows
from romer.reporting.tracking import default_run_name, log_run


def mci(values):
    m = sum(values) / len(values)
    return {"mean": m, "std": 0.5, "ci95": [m - 1.0, m + 1.0], "per_seed": list(values)}


EVAL = {
    "model": "builtin", "dataset": "builtin-test", "tokens": 4096, "seq_len": 256, "seeds": [0, 1, 2],
    "noise": {"source": "data/chip/pcm_sample.csv", "prog_scale": 1.0, "read_scale": 1.0, "drift_scale": 1.0,
              "strength": 1.0, "t_inference_s": 86400.0, "drift_compensation": True,
              "analog": ["routed_experts", "router"], "tile": [512, 512], "weight_scaling": None,
              "periphery": {"preset": "aihwkit-io-default"}, "variation": {"sigma_spread": 0.0}},
    "ppl": {"clean": 20.0, "noisy": mci([40.0, 42.0, 44.0]), "replace_only": mci([35.0, 36.0, 37.0]),
            "calibrate_only": mci([30.0, 31.0, 32.0]), "romer": mci([25.0, 26.0, 27.0])},
    "ppl_reduction_pct": 38.1, "ppl_reduction_ci95": [35.0, 41.2],
    "load_balance": {"clean": {"cv": 0.3, "maxvio": 0.8, "underactivated_frac": 0.0, "routing_agreement": 1.0},
                     "noisy": {"cv": 0.9, "maxvio": 2.5, "underactivated_frac": 0.2, "routing_agreement": 0.6},
                     "romer": {"cv": 0.5, "maxvio": 1.2, "underactivated_frac": 0.05, "routing_agreement": 0.8}},
    "tasks": {"builtin_cloze": {"metric": "acc", "n_items": 200, "clean": 0.5, "noisy": mci([0.3, 0.32, 0.34]),
                                "romer": mci([0.4, 0.42, 0.44])}},
}


def get(url, endpoint, **query):
    q = "?" + urllib.parse.urlencode(query) if query else ""
    with urllib.request.urlopen(f"{url}{endpoint}{q}", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a temporary sqlite store, in its own process group."""
    tmp = tmp_path_factory.mktemp("mlflow")
    with mlflow_server(f"sqlite:///{tmp / 'm.db'}", artifact_root=tmp / "art", log_path=tmp / "server.log") as url:
        yield url


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A run directory holding the artifacts `evaluate` leaves behind."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "noise").mkdir()
    (tmp_path / "noise" / "noise_model.json").write_text('{"format": "romer-noise-model/1"}\n')
    (tmp_path / "metrics" / "plots").mkdir(parents=True)
    (tmp_path / "metrics" / "replacement_plan.json").write_text('{"replaced": 0, "layers": {}}\n')
    (tmp_path / "metrics" / "plots" / "ppl.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return tmp_path


ARTIFACTS = ["noise/noise_model.json", "metrics/replacement_plan.json", "metrics/plots/ppl.png"]


def test_method_rows_and_headline():
    rows = {r["method"]: r for r in method_rows(EVAL)}
    assert list(rows) == ["clean", "noisy", "replace_only", "calibrate_only", "romer"]
    r = rows["romer"]
    assert (r["ppl_mean"], r["ppl_ci_lo"], r["ppl_ci_hi"]) == (26.0, 25.0, 27.0)
    assert r["reduction_pct"] == pytest.approx(100 * (42 - 26) / 42)  # positive: better than noisy
    assert rows["noisy"]["reduction_pct"] == 0.0
    assert (r["load_cv"], r["maxvio"], r["routing_agreement"]) == (0.5, 1.2, 0.8)
    assert r["task.builtin_cloze"] == pytest.approx(0.42)
    assert r["per_seed"] == [(0, 25.0), (1, 26.0), (2, 27.0)]
    assert rows["clean"]["ppl_ci_lo"] == rows["clean"]["ppl_mean"] == 20.0 and rows["clean"]["per_seed"] == []
    h = headline(EVAL)
    assert h["ppl_clean"] == 20.0 and h["ppl_noisy"] == 42.0 and h["ppl_romer"] == 26.0
    assert h["romer_reduction_pct"] == 38.1 and h["best_method"] == "romer" and h["seeds"] == 3


def test_run_name_says_what_differs_from_the_defaults(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert default_run_name(Params()) == "evaluate defaults"
    p = Params(noise={"prog_scale": 1.5}, cim={"periphery": {"preset": "aihwkit-hwa"}},
               mlflow={"tracking_uri": "http://x:1"})  # mlflow.* is not part of what a run is
    assert default_run_name(p) == "evaluate noise.prog_scale=1.5 cim.periphery.preset=aihwkit-hwa"
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-fawn")
    assert default_run_name(p, "sweep x2").startswith("brisk-fawn: sweep x2 noise.prog_scale=1.5")


def runs_search(server, experiment_id, flt=""):
    body = json.dumps({"experiment_ids": [experiment_id], "filter": flt, "max_results": 100}).encode()
    req = urllib.request.Request(server + "/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read()).get("runs", [])


def test_log_run_reads_back_through_rest_api(server, workdir, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    params = Params(mlflow={"tracking_uri": server, "experiment": "romer-test"},
                    noise={"prog_scale": 1.5, "read_scale": 0.5})
    t0 = time.time() - 30  # the stage began 30 s ago: the run spans its work
    run_id = log_run(params, EVAL, extra_metrics={"wall_time_s": 12.5}, artifacts=ARTIFACTS, started_at=t0,
                     inputs=[("chip.csv", Path("noise/noise_model.json"), "noise_fit")])
    assert run_id

    run = get(server, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert int(run["info"]["end_time"]) - int(run["info"]["start_time"]) >= 29_000
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    params_ = {p["key"]: p["value"] for p in run["data"]["params"]}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert metrics == {"tokens": 4096, "seeds": 3, "ppl_clean": 20.0, "ppl_noisy": 42.0, "ppl_romer": 26.0,
                       "romer_reduction_pct": 38.1, "romer_reduction_ci_lo": 35.0, "romer_reduction_ci_hi": 41.2,
                       "load_cv_noisy": 0.9, "load_cv_romer": 0.5, "best_reduction_pct": pytest.approx(38.095),
                       "wall_time_s": 12.5}
    assert params_["noise.prog_scale"] == "1.5" and params_["noise.read_scale"] == "0.5"
    assert params_["cim.tile"] == "[512, 512]" and params_["cim.periphery.out_noise"] == "null"
    assert set(params_) == set(flatten(params.model_dump(mode="json")))  # every key of params.yaml
    assert run["info"]["run_name"] == "evaluate noise.prog_scale=1.5 noise.read_scale=0.5"
    assert tags["model"] == "builtin" and tags["noise_source"] == "data/chip/pcm_sample.csv"
    assert tags["git_commit"] == "unknown" and tags["git_dirty"] == "unknown"  # not a git checkout
    assert tags["dataset"] == "builtin-test" and tags["dvc_experiment"] == "none"
    assert "noise.prog_scale=1.5" in tags["mlflow.note.content"]
    assert [i["dataset"]["name"] for i in run["inputs"]["dataset_inputs"]] == ["chip.csv"]

    children = runs_search(server, run["info"]["experiment_id"], f"tags.mlflow.parentRunId = '{run_id}'")
    by_method = {c["data"]["tags"][[t["key"] for t in c["data"]["tags"]].index("method")]["value"]: c
                 for c in children}
    assert sorted(by_method) == ["calibrate_only", "clean", "noisy", "replace_only", "romer"]
    for method, c in by_method.items():  # the same keys for every method (that has them): Compare lines up
        keys = {m["key"] for m in c["data"]["metrics"]}
        want = set(METHOD_KEYS) if method in EVAL["load_balance"] else {"ppl_mean", "ppl_ci_lo", "ppl_ci_hi"}
        assert want <= keys, (method, keys)
    romer = {m["key"]: m["value"] for m in by_method["romer"]["data"]["metrics"]}
    assert romer["ppl_mean"] == 26.0 and romer["task.builtin_cloze"] == pytest.approx(0.42)
    hist = get(server, "/api/2.0/mlflow/metrics/get-history", run_id=by_method["romer"]["info"]["run_id"],
               metric_key="ppl_per_seed")["metrics"]
    assert sorted((int(m["step"]), m["value"]) for m in hist) == [(0, 25.0), (1, 26.0), (2, 27.0)]

    def listing(path=None):
        q = {"run_id": run_id, **({"path": path} if path else {})}
        return {f["path"] for f in get(server, "/api/2.0/mlflow/artifacts/list", **q).get("files", [])}

    assert listing() == {"noise", "metrics", "methods.json"}  # only what this run made or used
    assert listing("metrics") == {"metrics/replacement_plan.json", "metrics/plots"}


def test_git_tags_in_a_checkout():
    from romer.reporting.tracking import git_commit, git_dirty

    here = Path(__file__).parent
    cwd = os.getcwd()
    os.chdir(here)
    try:
        assert len(git_commit()) == 40 and git_dirty() in ("true", "false")
    finally:
        os.chdir(cwd)


def test_log_run_to_local_sqlite(workdir):
    """The default params (sqlite:///mlflow.db in the run directory) need no server."""
    import mlflow

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    params = Params(mlflow={"tracking_uri": uri}, noise={"prog_scale": 2.0, "drift_scale": 0.5, "t_inference_s": 25},
                    cim={"periphery": {"preset": "aihwkit-hwa"}})
    run_id = log_run(params, EVAL, artifacts=ARTIFACTS)
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.info.run_name.startswith("evaluate noise.prog_scale=2 noise.drift_scale=0.5")
    assert run.data.params["noise.prog_scale"] == "2.0" and run.data.params["cim.periphery.preset"] == "aihwkit-hwa"
    assert "noise.strength" not in run.data.metrics  # eval.json's noise label is not a metric
    assert run.data.metrics["ppl_romer"] == 26.0
    assert run.data.tags["noise_source"] == "data/chip/pcm_sample.csv"
    assert "noise/noise_model.json" in {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id, "noise")}


def write_run_dir(tmp, uri, experiment="romer-cli"):
    (tmp / "params.yaml").write_text(yaml.safe_dump({"mlflow": {"tracking_uri": uri, "experiment": experiment}}))
    (tmp / "metrics").mkdir(exist_ok=True)
    (tmp / "metrics" / "eval.json").write_text(json.dumps(EVAL))


def test_mlflow_log_command_logs_committed_metrics(server, workdir, capsys):
    write_run_dir(workdir, server)
    assert cli_main(["mlflow-log"]) == 0
    out = capsys.readouterr().out
    run_id = out.split("logged run ")[1].split()[0]
    run = get(server, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert {m["key"]: m["value"] for m in run["data"]["metrics"]}["ppl_noisy"] == 42.0


def test_unreachable_server_warns_and_returns_none(capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    assert log_run(Params(mlflow={"tracking_uri": uri}), EVAL) is None
    assert time.time() - t0 < 15
    err = capsys.readouterr().err
    assert "warning: MLflow logging to " + uri in err and "romer mlflow-log" in err


def test_disabled_logs_nothing():
    assert log_run(Params(mlflow={"tracking_uri": "http://127.0.0.1:1", "enabled": False}), EVAL) is None


def test_mlflow_log_command_unreachable_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    write_run_dir(tmp_path, uri)
    t0 = time.time()
    assert cli_main(["mlflow-log"]) == 2
    assert time.time() - t0 < 15
    err = capsys.readouterr().err
    assert "\nerror: cannot log to MLflow at " + uri in err and "not reachable" in err
    assert "Traceback" not in err


def test_mlflow_log_command_without_metrics_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("mlflow: {tracking_uri: 'http://127.0.0.1:1'}\n")
    assert cli_main(["mlflow-log"]) == 2
    assert "metrics/eval.json not found" in capsys.readouterr().err


@pytest.mark.parametrize("uri, needle", [
    ("mlruns", "not a tracking URI"),
    ("my-server:5000", "not a tracking URI"),
    ("sqlite://mlflow.db", "three slashes"),
    ("ftp://host/x", "not a tracking URI"),
])
def test_garbage_tracking_uri_is_refused_with_the_params(tmp_path, uri, needle):
    from romer.core.errors import UserError
    from romer.core.params import load_params

    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"mlflow": {"tracking_uri": uri}}))
    with pytest.raises(UserError) as e:
        load_params(p)
    assert "key 'mlflow.tracking_uri'" in str(e.value) and needle in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_sqlite_uri_to_a_directory_fails_fast(workdir, capsys):
    from romer.core.errors import UserError

    (workdir / "db").mkdir()
    params = Params(mlflow={"tracking_uri": f"sqlite:///{workdir / 'db'}"})
    t0 = time.time()
    with pytest.raises(UserError, match="is a directory; give a database file"):
        log_run(params, EVAL, strict=True)
    assert log_run(params, EVAL) is None  # the stage: one warning, the metrics are kept
    assert time.time() - t0 < 5
    assert "warning: MLflow logging skipped:" in capsys.readouterr().err


@pytest.mark.parametrize("how, status, code", [("sigterm", "KILLED", 143), ("sigint", "KILLED", 130),
                                                ("error", "FAILED", None)])
def test_interrupted_logging_ends_the_run(workdir, monkeypatch, how, status, code):
    """SIGTERM or Ctrl-C while the artifacts upload: the run ends KILLED, not RUNNING forever; an error: FAILED."""
    import mlflow

    uri = f"sqlite:///{workdir / 'mlflow.db'}"

    def interrupt(*a, **k):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        elif how == "sigint":
            raise KeyboardInterrupt
        raise OSError("disk full")

    monkeypatch.setattr(mlflow, "log_metrics", interrupt)
    if code is None:
        assert log_run(Params(mlflow={"tracking_uri": uri}), EVAL) is None  # warns, the stage goes on
    else:
        with pytest.raises(SystemExit) as e:
            log_run(Params(mlflow={"tracking_uri": uri}), EVAL)
        assert e.value.code == code
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("romer").experiment_id])
    assert [r.info.status for r in runs] == [status]


def test_mlflow_log_command_options(workdir, capsys):
    import mlflow

    uri = f"sqlite:///{workdir / 'other.db'}"
    (workdir / "params.yaml").write_text("mlflow: {tracking_uri: 'http://127.0.0.1:1'}\n")
    (workdir / "old_eval.json").write_text(json.dumps(EVAL))
    assert cli_main(["mlflow-log", "--eval-json", "old_eval.json", "--run-name", "rerun-of-x",
                     "--tracking-uri", uri]) == 0
    run_id = capsys.readouterr().out.split("logged run ")[1].split()[0]
    assert mlflow.MlflowClient(uri).get_run(run_id).info.run_name == "rerun-of-x"
    (workdir / "bad.json").write_text("{not json")
    assert cli_main(["mlflow-log", "--eval-json", "bad.json", "--tracking-uri", uri]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err
