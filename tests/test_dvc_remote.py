"""The sharing and verification path of the README ("Sharing and verifying results"), end to end on a
throwaway two-stage DVC project (no model is trained): dvc remote add + repro + push, git clone + dvc
pull, then `dvc status` is clean, `dvc repro` runs nothing, and `dvc repro --force` + `dvc metrics diff
HEAD` is how a reviewer checks a rerun against the committed numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
GIT_ID = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

MAKE = ("import json, pathlib; n = json.load(open('params.json'))['n']; "
        "pathlib.Path('data').mkdir(exist_ok=True); "
        "pathlib.Path('data/values.txt').write_text(''.join(f'{i * i}\\n' for i in range(n)))")
SUMMARIZE = ("import json, pathlib; v = [int(x) for x in open('data/values.txt')]; "
             "pathlib.Path('metrics').mkdir(exist_ok=True); "
             "pathlib.Path('metrics/summary.json').write_text(json.dumps({'count': len(v), 'mean': sum(v) / len(v)}))")
PIPELINE = {"stages": {
    "make": {"cmd": f'python -c "{MAKE}"', "deps": ["params.json"], "outs": ["data/values.txt"]},
    "summarize": {"cmd": f'python -c "{SUMMARIZE}"', "deps": ["data/values.txt"],
                  "metrics": [{"metrics/summary.json": {"cache": False}}]},
}}


def make_env(tmp: Path) -> dict:
    """Nothing outside tmp: DVC's site cache and global/system config, HF caches, no analytics."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               DVC_SITE_CACHE_DIR=str(tmp / "dvc_site"), DVC_GLOBAL_CONFIG_DIR=str(tmp / "dvc_global"),
               DVC_SYSTEM_CONFIG_DIR=str(tmp / "dvc_system"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp / ".hf_home"), **GIT_ID)
    env.pop("DVC_ROOT", None)
    return env


def run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def test_push_clone_pull_status_repro_metrics_diff(tmp_path):
    env = make_env(tmp_path)
    origin, clone, remote = tmp_path / "origin", tmp_path / "clone", tmp_path / "remote"
    origin.mkdir()

    # The author: a git + DVC project with a default remote, run, pushed, committed.
    run(["git", "init", "-q"], origin, env)
    run(["dvc", "init", "-q"], origin, env)
    run(["dvc", "config", "core.analytics", "false"], origin, env)
    run(["dvc", "remote", "add", "-d", "store", str(remote)], origin, env)
    (origin / "params.json").write_text('{"n": 10}\n')
    (origin / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    out = run(["dvc", "repro"], origin, env)
    assert "Running stage 'make'" in out and "Running stage 'summarize'" in out
    assert json.loads((origin / "metrics/summary.json").read_text()) == {"count": 10, "mean": 28.5}
    out = run(["dvc", "push"], origin, env)
    assert "1 file pushed" in out, out
    run(["git", "add", "-A"], origin, env)
    run(["git", "commit", "-qm", "results"], origin, env)
    assert run(["git", "status", "--porcelain"], origin, env).strip() == ""

    # The reviewer: git clone + dvc pull; the remote comes with the clone (.dvc/config is committed).
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    assert not (clone / "data/values.txt").exists()  # cached output: not in git, only in the remote
    listed = run(["dvc", "remote", "list"], clone, env).split()
    assert listed[:3] == ["store", str(remote), "(default)"], listed
    run(["dvc", "pull"], clone, env)
    assert (clone / "data/values.txt").read_text() == (origin / "data/values.txt").read_text()
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env)
    out = run(["dvc", "repro"], clone, env)
    assert "Running stage" not in out, out
    assert "Stage 'make' didn't change" in out and "Stage 'summarize' didn't change" in out
    assert "Data and pipelines are up to date" in out

    # Verifying the committed numbers: rerun everything, diff the metrics against the commit.
    out = run(["dvc", "repro", "--force"], clone, env)
    assert "Running stage 'make'" in out and "Running stage 'summarize'" in out
    assert json.loads(run(["dvc", "metrics", "diff", "HEAD", "--json"], clone, env) or "{}") == {}
    assert run(["git", "status", "--porcelain"], clone, env).strip() == ""  # bit-identical metrics

    # And the diff does show a rerun that gives other numbers (here: another param value).
    (clone / "params.json").write_text('{"n": 4}\n')
    run(["dvc", "repro"], clone, env)
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "--json"], clone, env))
    assert diff["metrics/summary.json"]["count"] == {"old": 10, "new": 4, "diff": -6}
    assert diff["metrics/summary.json"]["mean"]["new"] == 3.5
