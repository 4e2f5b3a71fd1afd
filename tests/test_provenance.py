"""Provenance (romer.core.provenance): content hashes, git_dirty that ignores DVC outputs, the pinned
sha256 of a local model source, and the `provenance`/`versions` blocks of eval.json."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build

from romer.core.errors import UserError
from romer.core.params import Params
from romer.core.provenance import (
    dvc_outputs,
    git_commit,
    git_dirty,
    hash_dir,
    hash_file,
    model_files_sha256,
    model_sha256,
    provenance,
    versions,
)

GIT_ID = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, env=dict(os.environ, **GIT_ID), capture_output=True, text=True,
                          check=True).stdout


def test_hash_dir_is_content_and_path_sensitive(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
    (a / "config.json").write_text("{}")
    (a / "sub" / "w.safetensors").write_bytes(b"\x00" * 100)
    (b / "sub" / "w.safetensors").write_bytes(b"\x00" * 100)  # written in the other order
    (b / "config.json").write_text("{}")
    (b / ".cache").mkdir()
    (b / ".cache" / "junk").write_text("ignored")  # hidden: not part of the content
    assert hash_dir(a) == hash_dir(b)
    assert hash_file(a / "config.json") == hash_file(b / "config.json")
    (b / "config.json").write_text('{"x": 1}')
    assert hash_dir(a) != hash_dir(b)
    (b / "config.json").write_text("{}")
    (b / "sub" / "w.safetensors").rename(b / "sub" / "v.safetensors")  # same bytes, other name
    assert hash_dir(a) != hash_dir(b)
    # Model files: top level, weights/config/tokenizer patterns only.
    (a / "README.md").write_text("not part of the model")
    (a / "model.safetensors").write_bytes(b"w")
    h = model_files_sha256(a)
    (a / "README.md").write_text("edited")
    (a / "sub" / "w.safetensors").write_bytes(b"other")
    assert model_files_sha256(a) == h
    (a / "model.safetensors").write_bytes(b"w2")
    assert model_files_sha256(a) != h


DVC_YAML = """
stages:
  train:
    cmd: python train.py
    deps: [train.py]
    outs: [models/model]
    metrics:
      - metrics/train.json:
          cache: false
    plots:
      - metrics/plots/loss.csv:
          cache: false
          x: step
"""
SUB_DVC_YAML = """
stages:
  point:
    foreach: [1, 2]
    do:
      wdir: ..
      cmd: python point.py ${item}
      outs:
        - metrics/sweep/scale_${item}.json:
            cache: false
  report:
    wdir: ..
    cmd: python report.py
    metrics:
      - metrics/report.json:
          cache: false
"""


def test_git_dirty_ignores_dvc_outputs(tmp_path):
    repo = tmp_path / "repo"
    (repo / "metrics" / "plots").mkdir(parents=True)
    (repo / "metrics" / "sweep").mkdir()
    (repo / "beyond").mkdir()
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "beyond" / "dvc.yaml").write_text(SUB_DVC_YAML)
    files = ["train.py", "params.yaml", "dvc.lock", "beyond/dvc.lock", "metrics/train.json",
             "metrics/plots/loss.csv", "metrics/sweep/scale_1.json", "metrics/report.json"]
    for f in files:
        (repo / f).write_text("0\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    assert git_commit(repo) == git(repo, "rev-parse", "HEAD").strip()
    assert git_dirty(repo) == "false"

    paths, globs = dvc_outputs(repo)
    assert {"models/model", "metrics/train.json", "metrics/plots/loss.csv", "dvc.lock", "beyond/dvc.lock",
            "metrics/report.json"} <= set(paths)
    assert "metrics/sweep/scale_*.json" in globs

    # What `dvc repro` rewrites: the cache: false metrics and plots, both dvc.lock files.
    for f in files[2:]:
        (repo / f).write_text("1\n")
    assert git_dirty(repo) == "false"
    assert git_dirty(repo / "metrics") == "false"  # from a subdirectory too
    # A change of code or params is dirty; so is a staged one and a rename.
    (repo / "params.yaml").write_text("x: 1\n")
    assert git_dirty(repo) == "true"
    git(repo, "checkout", "params.yaml")
    assert git_dirty(repo) == "false"
    git(repo, "mv", "train.py", "train2.py")
    assert git_dirty(repo) == "true"
    git(repo, "mv", "train2.py", "train.py")
    (repo / "dvc.yaml").write_text(DVC_YAML + "\n")  # the pipeline definition is not an output
    assert git_dirty(repo) == "true"


def test_git_outside_a_checkout(tmp_path):
    assert git_commit(tmp_path) == "unknown" and git_dirty(tmp_path) == "unknown"


def save_tiny(d, seed=0):
    build("olmoe", seed=seed).save_pretrained(d)
    return d


def test_local_model_source_records_and_checks_its_sha256(tmp_path, monkeypatch, capsys):
    from romer.moe import models as M

    monkeypatch.chdir(tmp_path)
    src = save_tiny(tmp_path / "my_model")
    digest = model_files_sha256(src)
    out = tmp_path / "models" / "model"

    ref = M.fetch_external(Params(model={"source": str(src)}).model, out)
    assert ref["sha256"] == digest
    assert "model.revision: " + digest in capsys.readouterr().out  # tells how to pin it
    assert json.loads((out / "source.json").read_text())["sha256"] == digest
    assert model_sha256(out) == digest
    assert M.resolve_source(str(out)) == src

    # Pinned in params.yaml: a matching pin passes, another one stops fetch_model (DVC reruns it on a pin
    # change, since params.model is a dep of fetch_model).
    M.fetch_external(Params(model={"source": str(src), "revision": digest}).model, out)
    with pytest.raises(UserError, match="model.revision.*weights changed"):
        M.fetch_external(Params(model={"source": str(src), "revision": "0" * 64}).model, out)

    # The weights change after fetch_model: loading through the pointer refuses, naming the new pin.
    w = src / "model.safetensors"
    tensors = load_file(w)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, w, metadata={"format": "pt"})
    new = model_files_sha256(src)
    assert new != digest
    with pytest.raises(UserError, match=f"changed since fetch_model.*model.revision: {new}"):
        M.resolve_source(str(out))
    with pytest.raises(UserError, match="weights changed"):  # the old pin stops the rerun too
        M.fetch_external(Params(model={"source": str(src), "revision": digest}).model, out)
    # With the new pin the output changes, so every stage after fetch_model reruns.
    before = (out / "source.json").read_bytes()
    M.fetch_external(Params(model={"source": str(src), "revision": new}).model, out)
    assert (out / "source.json").read_bytes() != before and model_sha256(out) == new
    assert M.resolve_source(str(out)) == src


def test_provenance_block(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = save_tiny(tmp_path / "models" / "model")
    (tmp_path / "noise").mkdir()
    (tmp_path / "noise" / "noise_model.json").write_text('{"kind": "gaussian"}\n')
    p = provenance()
    assert p == {"model_sha256": model_files_sha256(model),
                 "noise_model_sha256": hash_file(tmp_path / "noise" / "noise_model.json")}
    assert len(p["model_sha256"]) == 64
    v = versions()
    assert v["torch"] == torch.__version__.split("+")[0] or v["torch"] == torch.__version__
    import transformers

    assert v["transformers"] == transformers.__version__ and "lm_eval" in v


def test_provenance_tags_come_from_eval_json(monkeypatch):
    import romer.reporting.tracking as tr

    monkeypatch.setattr(tr, "git_commit", lambda: "c" * 40)  # the checkout's, at logging time
    monkeypatch.setattr(tr, "git_dirty", lambda: "false")
    provenance_tags = tr.provenance_tags
    ev = {"provenance": {"model_sha256": "a" * 64, "noise_model_sha256": None},
          "versions": {"python": "3.12.0", "torch": "2.13.0", "transformers": "5.24.0", "lm_eval": None}}
    tags = provenance_tags(ev)
    assert tags == {"model_sha256": "a" * 64, "noise_model_sha256": "unknown", "git_commit": "c" * 40,
                    "git_dirty": "false", "version.python": "3.12.0", "version.torch": "2.13.0",
                    "version.transformers": "5.24.0", "version.lm_eval": "none"}


def test_eval_json_records_provenance_and_versions(tmp_path, monkeypatch, one_thread):
    """profile -> replace -> percentiles -> evaluate in process on a tiny model saved as models/model."""
    import romer.pipeline.stages as pl
    from romer.cim.noise_models import gaussian
    from romer.pipeline.experiment import Experiment

    class TinyExp(Experiment):  # random token windows: no corpus or tokenizer needed
        def windows(self, *a, **k):
            return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))

        def calib_windows(self):
            return self.windows()

    monkeypatch.chdir(tmp_path)
    model_dir = save_tiny(tmp_path / "models" / "model")
    (tmp_path / "noise").mkdir()
    (tmp_path / "noise" / "noise_model.json").write_text('{"placeholder": true}\n')
    params = Params(calib={"seeds": [100]}, eval={"seeds": [0], "tasks": [], "hetero_fractions": []},
                    mlflow={"enabled": False})
    exp = TinyExp(params, model=build("olmoe"), noise_model=gaussian(0.05))
    pl.run_profile(params, exp)
    pl.run_replace(params)
    pl.run_percentiles(params, exp)
    pl.run_evaluate(params, exp, log_mlflow=False)
    ev = json.loads((tmp_path / pl.EVAL_JSON).read_text())
    assert ev["provenance"] == {"model_sha256": model_files_sha256(model_dir),
                                "noise_model_sha256": hash_file(tmp_path / "noise" / "noise_model.json")}
    assert ev["versions"] == versions() and ev["versions"]["transformers"]
    from romer.pipeline.experiment import noise_label

    assert ev["noise"] == noise_label(params)  # what the noisy numbers were made at (the architectures check)
    assert ev["noise"]["prog_scale"] == params.noise.prog_scale and "scale" not in ev["noise"]
