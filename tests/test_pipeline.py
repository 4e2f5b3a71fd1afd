"""End to end: all six stages through `dvc repro` on a tiny config in a temp copy of the repo, then
which stages a param change makes stale."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

GIT_ID = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
TINY = {
    "builtin": {"max_chars": 300_000, "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 2,
                "num_experts": 8, "top_k": 2, "intermediate_size": 64, "seq_len": 64, "batch_size": 8,
                "steps": 30, "warmup_steps": 5, "eval_windows": 4},
    "noise": {"source": "pcm-joshi2020", "prog_scale": 3.0, "read_scale": 3.0},
    "calib": {"n_seqs": 8, "seq_len": 64, "batch_size": 8, "seeds": [100]},
    "eval": {"seq_len": 64, "max_tokens": 2048, "seeds": [0, 1], "tasks": ["builtin_cloze"], "task_limit": 16},
}


def run(cmd, cwd, check=True, **kw):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(Path(cwd) / ".hf_home"), PYTHONUNBUFFERED="1", **GIT_ID)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def merge(base, over):
    for k, v in over.items():
        if isinstance(v, dict):
            merge(base.setdefault(k, {}), v)
        else:
            base[k] = v
    return base


def copy_repo(dst: Path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file() and not f.startswith(("metrics/", "dvc.lock")):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    run(["git", "init", "-q"], dst)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dst)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], dst)


def stale(cwd):
    out = run(["dvc", "status", "dvc.yaml", "--json"], cwd).stdout  # the six stages (not beyond/)
    return sorted(json.loads(out or "{}"))


def set_params(cwd, over):
    p = Path(cwd) / "params.yaml"
    params = merge(yaml.safe_load(p.read_text()), over)
    p.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_dvc_repro_tiny_pipeline(tmp_path):
    copy_repo(tmp_path)
    set_params(tmp_path, merge(TINY, {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    r = run(["dvc", "repro"], tmp_path, timeout=1200)
    for stage in ("fetch_model", "fit_noise", "profile", "replace", "percentiles", "evaluate"):
        assert f"'{stage}'" in r.stdout, r.stdout[-2000:]
    ev = json.loads((tmp_path / "metrics/eval.json").read_text())
    assert ev["seeds"] == [0, 1]
    for m in ("noisy", "replace_only", "calibrate_only", "temperature_only", "affine_columns", "romer"):
        s = ev["ppl"][m]
        assert len(s["per_seed"]) == 2 and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    # ROMER against every other method, paired per chip
    assert set(ev["romer_vs"]) == set(ev["ppl"]) - {"clean", "noisy", "romer"}
    vs = ev["romer_vs"]["temperature_only"]
    assert vs["ci95"][0] <= vs["pct"] <= vs["ci95"][1]
    assert ev["ppl"]["clean"] > 1
    assert ev["noise"]["source"] == "pcm-joshi2020" and ev["noise"]["prog_scale"] == ev["noise"]["read_scale"] == 3.0
    assert ev["noise"]["drift_scale"] == 1.0 and ev["noise"]["t_inference_s"] == 86400.0
    assert ev["noise"]["tile"] == [512, 512] and ev["noise"]["periphery"]["preset"] == "aihwkit-io-default"
    assert {"hetero_digital_12p5pct", "hetero_digital_25pct", "romer_expected"} <= set(ev["ppl"])
    assert set(ev["load_balance"]) >= {"clean", "noisy", "romer"}
    assert "builtin_cloze" in ev["tasks"]
    for f in ("profile.json", "replacement_plan.json", "noise_fit.json", "plots/eval_ppl.png",
              "plots/profile_load.png", "plots/profile_heatmap.png", "plots/noise_fit.png", "summary.json"):
        assert (tmp_path / "metrics" / f).is_file(), f
    assert stale(tmp_path) == []
    main_report = (tmp_path / "metrics/report.md").read_text()
    assert "## Methods (test split)" in main_report and "](plots/profile_heatmap.png)" in main_report
    assert "Noise-strength sweep" not in main_report  # the main page has only what the main pipeline made
    for link in re.findall(r"\]\((plots/[^)]+)\)", main_report):
        assert (tmp_path / "metrics" / link).is_file(), link
    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert summary["ppl_romer"] == round(ev["ppl"]["romer"]["mean"], 4) and summary["seeds"] == 2

    # The DVC plots render (`dvc plots show --json`: the Vega-Lite specs with their data): no errors, the
    # methods as bars, and the multi-column plots with every column over an x that does not repeat.
    shown = json.loads(run(["dvc", "plots", "show", "--json"], tmp_path).stdout)
    beyond = ("metrics/plots/sweep.png", "metrics/plots/drift.png")  # beyond/dvc.yaml has not run yet
    assert not [e for e in shown.get("errors") or [] if e["name"] not in beyond], shown.get("errors")
    specs = {k: v[0]["content"] for k, v in shown["data"].items() if v and v[0]["type"] == "vega"}
    assert specs["metrics/plots/eval_ppl.csv"]["mark"]["type"] == "bar"
    assert {r["method"] for r in specs["metrics/plots/eval_ppl.csv"]["data"]["values"]} >= {"clean", "noisy", "romer"}
    slot = specs["load_per_expert_slot"]["data"]["values"]
    assert {r["field"] for r in slot} == {"clean", "noisy"}
    xs = [r["slot"] for r in slot if r["field"] == "noisy"]
    assert len(xs) == len(set(xs)) == 2 * 8  # layers x experts of the tiny model
    assert {r["field"] for r in specs["load_cv_per_layer"]["data"]["values"]} >= {"clean", "noisy", "romer"}
    assert "metrics/plots/profile_load.csv" not in specs  # drawn only by the top-level plot

    # Plain `dvc metrics show` is the headline only (one readable row); a detail file reads when named.
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], tmp_path).stdout)[""]["data"]
    assert list(metrics) == ["metrics/summary.json"]
    detail = json.loads(run(["dvc", "metrics", "show", "--json", "metrics/eval.json"], tmp_path).stdout)
    assert detail[""]["data"]["metrics/eval.json"]["data"]["tokens"] == ev["tokens"]

    # Incremental reruns: a percentile change touches percentiles + evaluate; eval seeds only evaluate.
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "ran"], tmp_path, check=False)
    set_params(tmp_path, {"calibrate": {"percentiles": [10, 90]}})
    assert stale(tmp_path) == ["evaluate", "percentiles"]
    run(["git", "checkout", "params.yaml"], tmp_path)
    set_params(tmp_path, {"eval": {"seeds": [0, 1, 2]}})
    assert stale(tmp_path) == ["evaluate"]

    # Killed midway (SIGKILL): nothing DVC would take as valid, and the rerun succeeds.
    before = (tmp_path / "metrics/eval.json").read_bytes()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **GIT_ID)
    proc = subprocess.Popen(["dvc", "repro"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if "evaluate: seeds x methods" in line:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # DVC removes a stage's outputs before running it; the stage itself writes atomically at the end,
    # so a kill leaves either no eval.json or the old one, never a partial file.
    ev_path = tmp_path / "metrics/eval.json"
    assert not ev_path.exists() or ev_path.read_bytes() == before
    assert stale(tmp_path) == ["evaluate"]
    run(["dvc", "repro"], tmp_path, timeout=900)
    assert stale(tmp_path) == []
    assert json.loads((tmp_path / "metrics/eval.json").read_text())["seeds"] == [0, 1, 2]
    assert not list((tmp_path / "metrics").glob(".*.tmp"))

    # Determinism: the same params and seeds give bit-identical metrics on a forced rerun.
    snap = {p.name: p.read_bytes() for p in (tmp_path / "metrics").glob("*.json")}
    run(["dvc", "repro", "--force"], tmp_path, timeout=1200)
    again = {p.name: p.read_bytes() for p in (tmp_path / "metrics").glob("*.json")}
    assert snap.keys() == again.keys()
    for name in snap:
        assert snap[name] == again[name], f"metrics/{name} differs between two dvc repro --force runs"

    # Sweeps through DVC's experiment queue: two queued experiments, run by a queue worker.
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], tmp_path)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "base"], tmp_path)
    for scale in ("2", "4"):
        run(["dvc", "exp", "run", "--queue", "-S", f"noise.prog_scale={scale}", "-S", "eval.tasks=[]"], tmp_path)
    run(["dvc", "queue", "start", "--jobs", "1"], tmp_path)
    deadline = time.time() + 1200
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], tmp_path).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(10)
    run(["dvc", "queue", "stop"], tmp_path, check=False)
    assert status.count("Success") == 2, status
    table = json.loads(run(["dvc", "exp", "show", "--json"], tmp_path).stdout)
    scales = set()
    for commit in table:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                p = rev.get("data", {}).get("params", {}).get("params.yaml", {}).get("data", {})
                if p:
                    scales.add(p["noise"]["prog_scale"])
    assert {2, 4} <= scales, scales

    # The beyond-the-paper pipeline on the same tiny model: a sweep point, the drift curve, two other
    # families trained with the tiny recipe, the architectures table and the report.
    set_params(tmp_path, {"eval": {"tasks": []}, "beyond": {
        "scales": [4], "drift_times_s": [3600],
        "families": {"qwen2_moe": {"family": "qwen2_moe", "shared_experts": 1},
                     "deepseek_moe": {"family": "deepseek_moe", "shared_experts": 1, "first_dense_layers": 1},
                     "deepseek_v3": {"family": "deepseek_v3", "shared_experts": 1, "n_group": 2, "topk_group": 1}}}})
    run(["dvc", "repro", "dvc.yaml"], tmp_path, timeout=900)  # eval.tasks changed: evaluate reruns
    run(["dvc", "repro", "beyond/dvc.yaml"], tmp_path, timeout=1200)
    sweep = json.loads((tmp_path / "metrics/sweep.json").read_text())
    assert sweep["scale"] == [4.0] and len(sweep["noisy"]) == len(sweep["romer"]) == len(sweep["temperature_only"]) == 1
    lo, hi = sweep["romer_vs_temperature_ci95"][0]
    assert lo <= sweep["romer_vs_temperature_pct"][0] <= hi
    point = json.loads((tmp_path / "metrics/sweep/scale_4.json").read_text())["noise"]
    assert point["strength"] == 4.0 and point["prog_scale"] == point["read_scale"] == 12.0  # 4 x noise.*_scale
    assert point["drift_scale"] == 1.0
    drift = json.loads((tmp_path / "metrics/drift.json").read_text())
    assert drift["t_s"] == [3600.0] and drift["noise"]["prog_scale"] == 3.0 and drift["noise"]["drift_scale"] == 1.0
    assert drift["noise"]["strength"] == 1.0 and drift["noise"]["periphery"]["preset"] == "aihwkit-io-default"
    assert all(len(drift[k]) == 1 for k in ("noisy", "romer", "romer_recalibrated"))
    arch = json.loads((tmp_path / "metrics/architectures.json").read_text())
    assert list(arch) == ["olmoe", "qwen2_moe", "deepseek_moe", "deepseek_v3"]
    assert arch["deepseek_v3"]["router"] == "sigmoid" and arch["qwen2_moe"]["shared_experts"] == 1
    assert arch["deepseek_moe"]["moe_layers"] == [1] and arch["olmoe"]["num_experts"] == 8
    frag = json.loads((tmp_path / "metrics/fragility.json").read_text())
    assert [f for f in frag if f != "noise"] == ["olmoe", "qwen2_moe", "deepseek_moe", "deepseek_v3"]
    assert [d["layer"] for d in frag["deepseek_moe"]["layers"]] == [1]
    for fam in ("olmoe", "qwen2_moe", "deepseek_moe", "deepseek_v3"):
        for d in frag[fam]["layers"]:
            assert 0 <= d["topk_changed_frac"] <= 1 and d["experts_row_crest_median"] >= 1 and d["margin_median"] >= 0
    for fam, row in arch.items():
        assert all(math.isfinite(row[k]) and row[k] > 1 for k in ("clean", "noisy", "romer")), (fam, row)
    report = (tmp_path / "metrics/report_beyond.md").read_text()
    assert "Across MoE families" in report and "What makes routing fragile" in report
    assert run(["dvc", "status", "beyond/dvc.yaml", "--json"], tmp_path).stdout.strip() in ("", "{}")
