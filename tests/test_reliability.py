"""Fault injection in evaluate, and no author paths or secrets in committed files."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_models import build

from romer.cim.noise_models import gaussian
from romer.core.params import Params
from romer.pipeline.experiment import Experiment

REPO = Path(__file__).resolve().parent.parent


class TinyExp(Experiment):
    """The real Experiment on an in-memory tiny OLMoE, with random token windows (no corpus)."""

    def windows(self, *a, **k):
        return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))

    def calib_windows(self):
        return self.windows()


def test_one_failing_seed_fails_the_stage(tmp_path, monkeypatch):
    import romer.pipeline.stages as pl

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "artifacts").mkdir()
    (tmp_path / pl.PLAN_JSON).write_text(json.dumps({"strategy": "split", "layers": {}, "replaced": 0}))
    (tmp_path / pl.PERCENTILES_JSON).write_text(json.dumps({"percentiles": [5.0, 95.0]}))
    params = Params(eval={"seeds": [0, 1, 2], "tasks": []}, mlflow={"enabled": False})
    done = []

    def fake_seed(exp, seed, *a, **k):
        if seed == 1:
            raise RuntimeError("injected failure in seed 1")
        done.append(seed)
        return {"noisy": {"ppl": 2.0}}

    monkeypatch.setattr(pl, "evaluate_seed", fake_seed)
    with pytest.raises(RuntimeError, match="injected failure in seed 1"):
        pl.run_evaluate(params, exp=TinyExp(params, model=build("olmoe"), noise_model=gaussian(0.05)),
                         log_mlflow=False)
    assert done == [0]  # stopped at the failure: never averaged over the seeds that happened to work
    assert not (tmp_path / pl.EVAL_JSON).exists()


def test_no_author_paths_or_secrets_in_committed_files():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    bad = re.compile(r"(/work/main|/root/|/home/\w+|/Users/\w+|AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|"
                     r"-----BEGIN [A-Z ]*PRIVATE KEY)")
    hits = []
    for f in files:
        p = REPO / f
        if p.suffix in (".png", ".safetensors") or not p.is_file() or f == "tests/test_reliability.py":
            continue
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{f}: {m.group(0)}" for m in bad.finditer(text)]
    assert not hits, hits


# ---- nothing a user made is lost: stage-level staging of outputs ---------------------------------
def test_staged_outputs_replace_all_or_nothing(tmp_path):
    from romer.core.errors import UserError
    from romer.core.io import commit_outputs, staged_outputs, write_json

    a, b = tmp_path / "a.json", tmp_path / "sub" / "b.json"
    write_json(a, {"v": "old"})
    with pytest.raises(RuntimeError, match="part-way"):
        with staged_outputs():
            write_json(a, {"v": "new"})
            write_json(b, {"v": "new"})
            assert json.loads(a.read_text()) == {"v": "old"}  # nothing moved before the end
            raise RuntimeError("failed part-way")
    assert json.loads(a.read_text()) == {"v": "old"} and not b.exists()
    assert not list(tmp_path.rglob(".*.tmp"))
    with staged_outputs():
        write_json(a, {"v": "new"})
        write_json(a, {"v": "newer"})  # the same output twice: the last one wins
        write_json(b, {"v": "new"})
        commit_outputs()  # e.g. before MLflow reads them back
        assert json.loads(b.read_text()) == {"v": "new"}
    assert json.loads(a.read_text()) == {"v": "newer"}
    # a file output never replaces a directory, and never goes under a file
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.csv").write_text("mine")
    with pytest.raises(UserError, match=r"d: it is an existing directory \(expected a file path\); nothing was deleted"):
        write_json(tmp_path / "d", {})
    with pytest.raises(UserError, match=r"a\.json is a file, not a directory"):
        write_json(a / "x.json", {})
    assert (tmp_path / "d" / "keep.csv").read_text() == "mine"


def test_stage_entry_keeps_old_outputs_when_the_stage_fails(tmp_path, capsys):
    from romer.core.errors import UserError, stage_entry
    from romer.core.io import write_json

    out = tmp_path / "metrics.json"
    write_json(out, {"run": 1})

    @stage_entry
    def stage():
        write_json(out, {"run": 2})
        raise UserError("bad input found late")

    with pytest.raises(SystemExit) as e:
        stage()
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad input found late\n"
    assert json.loads(out.read_text()) == {"run": 1}


# ---- stale inputs: each stage checks what its input artifacts were made with -----------------------
def test_stale_percentiles_and_missing_inputs_are_one_line(tmp_path, monkeypatch):
    import romer.pipeline.stages as pl
    from romer.core.errors import UserError

    monkeypatch.chdir(tmp_path)
    params = Params(eval={"tasks": []}, mlflow={"enabled": False})
    with pytest.raises(UserError, match=r"metrics/replacement_plan.json not found: it is made by the replace stage; "
                                        r"run `dvc repro replace` first"):
        pl.run_evaluate(params, log_mlflow=False)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "artifacts").mkdir()
    (tmp_path / pl.PLAN_JSON).write_text(json.dumps({"strategy": "split", "layers": {}, "replaced": 0}))
    (tmp_path / pl.PERCENTILES_JSON).write_text(json.dumps(
        {"percentiles": [5.0, 95.0], "made_with": {"calibrate.percentiles": [10.0, 90.0], "calib": params.calib.model_dump()}}))
    with pytest.raises(UserError, match=r"artifacts/percentiles.json is stale: calibrate.percentiles was \[10.0, 90.0\], "
                                        r"params.yaml has \[5.0, 95.0\]. Rerun `dvc repro percentiles`"):
        pl.run_evaluate(params, log_mlflow=False)  # refused before any model is loaded


def test_stale_noise_model_and_model_dir(tmp_path, monkeypatch):
    from romer.cim.stage import run_fit_noise
    from romer.core.errors import UserError
    from romer.moe.models import check_model_dir

    monkeypatch.chdir(tmp_path)
    shutil = __import__("shutil")
    shutil.copytree(REPO / "data" / "chip", tmp_path / "data" / "chip")
    made = Params(noise={"source": "data/chip/pcm_sample.csv"})
    run_fit_noise(made)
    other = Params(noise={"source": "reram-wan2022"})
    with pytest.raises(UserError, match=r"noise/noise_model.json is stale: noise.source was 'data/chip/pcm_sample.csv', "
                                        r"params.yaml has 'reram-wan2022'. Rerun `dvc repro fit_noise`"):
        Experiment._load_noise_model(type("E", (), {"params": other})(), "noise/noise_model.json")
    assert Experiment._load_noise_model(type("E", (), {"params": made})(), "noise/noise_model.json").g_max == 25.0
    # the model directory: missing, or made from other params
    with pytest.raises(UserError, match=r"models/model not found in .*: it is made by the fetch_model stage"):
        check_model_dir("models/model", made)
    d = tmp_path / "models" / "model"
    d.mkdir(parents=True)
    (d / "builtin_report.json").write_text(json.dumps({"config": {**made.builtin.model_dump(), "steps": 7}}))
    with pytest.raises(UserError, match=r"models/model is stale: builtin.steps was 7, params.yaml has 1800. "
                                        r"Rerun `dvc repro fetch_model`"):
        check_model_dir(d, made)
    with pytest.raises(UserError, match=r"model.source was 'builtin', params.yaml has 'me/x'"):
        check_model_dir(d, Params(model={"source": "me/x", "revision": "abc"}))
    (d / "builtin_report.json").write_text(json.dumps({"config": made.builtin.model_dump()}))
    check_model_dir(d, made)
    (d / "source.json").write_text(json.dumps({"kind": "hub", "id": "me/x", "revision": "abc"}))
    check_model_dir(d, Params(model={"source": "me/x", "revision": "abc"}))
    with pytest.raises(UserError, match=r"model.revision was 'abc', params.yaml has 'def'"):
        check_model_dir(d, Params(model={"source": "me/x", "revision": "def"}))


# ---- model loading is strict ----------------------------------------------------------------------
def test_missing_or_extra_weights_are_an_error(tmp_path, capsys):
    from romer.core.errors import UserError
    from romer.moe.models import fetch_external, load_model

    build("olmoe").save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # claims a layer the weights do not hold
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"the weights do not match config.json: \d+ tensor\(s\) missing from the weights "
                                        r"\(they would be randomly initialised\): model.layers.2.*allow_missing_weights"):
        load_model(str(tmp_path / "m"), device="cpu")
    model = load_model(str(tmp_path / "m"), device="cpu", allow_missing_weights=True)
    assert len(model.model.layers) == 3 and "warning:" in capsys.readouterr().err
    cfg["num_hidden_layers"] = 1  # fewer layers than the weights: unexpected tensors
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"in the weights but not in the model: model.layers.1"):
        load_model(str(tmp_path / "m"), device="cpu")
    # fetch_model may not read from its own output, nor from a file
    out = tmp_path / "models" / "model"
    out.mkdir(parents=True)
    for src in (out, out / "sub", tmp_path / "models"):
        src.mkdir(exist_ok=True)
        with pytest.raises(UserError, match=r"params key 'model.source': .* is \(or holds\) fetch_model's own output"):
            fetch_external(Params(model={"source": str(src)}).model, out)
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match=r"params key 'model.source': .*w.safetensors is a file; expected a model directory"):
        fetch_external(Params(model={"source": str(tmp_path / "w.safetensors")}).model, out)


def test_data_errors_name_the_right_key(tmp_path):
    from romer.core.errors import UserError
    from romer.data.text import calib_windows, eval_windows, load_text
    from romer.moe.models import load_tokenizer

    with pytest.raises(UserError, match=r"params key 'calib.dataset': .* is a directory; expected a UTF-8 text file"):
        load_text(str(tmp_path), key="calib.dataset")
    ids = torch.arange(1000)
    with pytest.raises(UserError, match=r"params key 'eval.max_tokens': 100 is fewer than one window of eval.seq_len=256"):
        eval_windows(ids, 256, max_tokens=100)
    with pytest.raises(UserError, match=r"params key 'calib.n_seqs': 8 windows of calib.seq_len=256 need 2048 tokens, "
                                        r"the text has 1000: the windows would overlap.*calib.allow_overlap: true"):
        calib_windows(ids, 8, 256)
    w = calib_windows(ids, 8, 256, allow_overlap=True)
    assert w.shape == (8, 256)
    assert calib_windows(ids, 3, 256).unique().numel() == 3 * 256  # disjoint when the text is long enough
    build("olmoe").save_pretrained(tmp_path / "m")  # weights and config, no tokenizer files
    with pytest.raises(UserError, match=r"model at .*m has no tokenizer files \(expected one of tokenizer.json"):
        load_tokenizer(str(tmp_path / "m"))


def test_sequence_longer_than_the_model_positions_is_refused():
    from romer.core.errors import UserError

    params = Params(calib={"seq_len": 128}, mlflow={"enabled": False})
    exp = Experiment(params, model=build("olmoe"), noise_model=gaussian(0.05))  # max_position_embeddings 64
    with pytest.raises(UserError, match=r"params key 'calib.seq_len': 128 is longer than the model's "
                                        r"max_position_embeddings \(64\)"):
        exp.calib_windows()
