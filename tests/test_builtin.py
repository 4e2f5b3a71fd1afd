"""The bundled corpus, its splits, and the builtin recipe (a few steps on a small slice)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from romer.core.errors import UserError
from romer.core.params import BuiltinParams
from romer.data.corpus import builtin_splits, read_corpus, split_text

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus"

TINY = dict(corpus_dir=str(CORPUS), max_chars=120_000, vocab_size=400, hidden_size=32, num_layers=2, num_heads=2,
            num_experts=4, top_k=2, intermediate_size=32, seq_len=32, batch_size=4, steps=6, warmup_steps=2,
            eval_every=3, eval_windows=4, eval_tokens=2048)


def _load_script(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- corpus

def test_corpus_is_bundled_with_provenance():
    texts = sorted(CORPUS.glob("*.txt"))
    assert len(texts) == 42
    assert (CORPUS / "README.md").is_file() and (CORPUS / "SOURCES.tsv").is_file()
    rows = (CORPUS / "SOURCES.tsv").read_text().splitlines()[1:]
    assert sorted(r.split("\t")[0] for r in rows) == [p.name for p in texts]
    assert not any("gutenberg" in p.read_text().lower() for p in texts[:5])


def test_read_corpus_and_splits_are_contiguous_and_deterministic():
    text = read_corpus(CORPUS, max_chars=200_000)
    assert len(text) == 200_000
    cfg = BuiltinParams(corpus_dir=str(CORPUS), max_chars=200_000, val_frac=0.1, test_frac=0.05, split_chunks=4)
    s1, s2 = builtin_splits(cfg), builtin_splits(cfg)
    assert s1 == s2
    assert sum(len(v) for v in s1.values()) == len(text)
    assert abs(len(s1["validation"]) / len(text) - 0.1) < 0.01
    assert abs(len(s1["test"]) / len(text) - 0.05) < 0.01
    # every piece is a contiguous run of the corpus, cut at a line end
    for piece in s1["validation"].split("\n\n")[:3]:
        assert piece in text


def test_split_text_interleaves_chunks():
    text = "".join(f"line {i}\n" for i in range(1000))
    s = split_text(text, 0.1, 0.1, chunks=2)
    assert s["train"] + s["validation"] + s["test"] != text  # held-out text from both halves
    assert s["train"].startswith("line 0\n") and s["test"].endswith("line 999\n")
    assert s["validation"] not in text  # two pieces, one from each half
    assert len(s["train"]) > 0.75 * len(text)
    assert all(v.endswith("\n") for v in s.values())
    assert split_text(text, 0.1, 0.1, chunks=1)["train"] + split_text(text, 0.1, 0.1, chunks=1)["validation"] \
        + split_text(text, 0.1, 0.1, chunks=1)["test"] == text


def test_missing_or_empty_corpus_names_the_path(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        read_corpus(tmp_path / "nowhere")
    with pytest.raises(UserError, match=str(tmp_path)):
        read_corpus(tmp_path)
    (tmp_path / "a.txt").write_text("\n\n")
    with pytest.raises(UserError, match="empty"):
        read_corpus(tmp_path)


def test_extract_script_strips_gutenberg_boilerplate():
    mod = _load_script("extract_corpus", REPO / "scripts" / "extract_corpus.py")
    raw = ("The Project Gutenberg EBook of Hamlet\r\nlicense blah\r\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET   \r\n\r\n\r\n\r\n\r\nBer.\r\n"
           "Who's there?\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nmore license\r\n")
    body, removed = mod.strip_gutenberg(raw)
    assert mod.normalise(body) == "HAMLET\n\n\nBer.\nWho's there?\n"
    assert removed == ["start-marker header", "end-marker footer"]


def test_params_validation():
    with pytest.raises(ValueError):
        BuiltinParams(top_k=20, num_experts=16)
    with pytest.raises(ValueError, match="even"):
        BuiltinParams(hidden_size=90, num_heads=6)  # head_dim 15: rotary needs an even head_dim
    BuiltinParams(hidden_size=96, num_heads=3)
    with pytest.raises(ValueError, match="warmup"):
        BuiltinParams(steps=10, warmup_steps=10)


# ----------------------------------------------------------------------------- recipe

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from romer.builtin.train import train_builtin

    out = tmp_path_factory.mktemp("builtin") / "model"
    report, model = train_builtin(BuiltinParams(**TINY), out, progress=False, return_model=True)
    return out, report, model


def test_train_builtin_report(tiny_run):
    out, report, _ = tiny_run
    for key in ("train_time_s", "params", "val_loss", "val_ppl", "test_ppl", "per_layer", "summary", "history"):
        assert key in report
    assert math.isclose(report["val_ppl"], math.exp(report["val_loss"]), rel_tol=1e-4)
    assert math.isfinite(report["test_ppl"]) and report["test_ppl"] < 400  # below uniform over the vocab
    assert len(report["history"]) == TINY["steps"]
    assert [h["step"] for h in report["history"] if "val_loss" in h] == [3, 6]
    assert len(report["per_layer"]) == TINY["num_layers"]
    for d in report["per_layer"]:
        assert {"cv", "maxvio", "entropy", "underactivated_frac"} <= set(d)
        assert math.isclose(sum(d["load"]), 1.0, abs_tol=1e-4)
    assert report["eval"]["val_windows"] == TINY["eval_tokens"] // TINY["seq_len"]
    json.dumps(report, allow_nan=False)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "builtin_report.json"} <= files
    assert not any(p.suffix == ".bin" for p in out.iterdir())
    assert not list(out.parent.glob(".model.*"))  # no temp dir left behind


def test_saved_model_reloads_with_identical_logits(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from romer.builtin.train import build_olmoe_config

    out, _, trained = tiny_run
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert cfg.model_type == "olmoe" and cfg.num_experts == 4 and cfg.num_experts_per_tok == 2
    assert cfg.norm_topk_prob is False and cfg.output_router_logits is False
    ref = build_olmoe_config(BuiltinParams(**TINY), len(tok))
    assert ref.to_dict()["hidden_size"] == cfg.hidden_size and ref.vocab_size == cfg.vocab_size

    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == text

    # The reloaded model gives exactly the logits of the trained one (kept by the fixture).
    again, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        a = trained(ids).logits
        b = model.eval()(ids).logits
        c = again.eval()(ids).logits
    assert torch.equal(a, b) and torch.equal(a, c)

    # The reported loss is the one transformers computes with labels=input_ids (what `evaluate` uses).
    from romer.builtin.train import evaluate

    w = torch.randint(0, cfg.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = again(input_ids=w, labels=w).loss.item()
    assert math.isclose(evaluate(again, w, batch_size=2), hf, rel_tol=1e-5)


def test_recipe_is_deterministic(tiny_run, tmp_path):
    from safetensors.torch import load_file

    from romer.builtin.train import train_builtin

    out, report, _ = tiny_run
    report2 = train_builtin(BuiltinParams(**TINY), tmp_path / "again", progress=False)
    assert report2["val_loss"] == report["val_loss"]
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the whole output directory is byte-identical (no wall times in it), so DVC sees the same output
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in files:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_fetch_model_stage_builtin(tmp_path, monkeypatch):
    stage = _load_script("fetch_model_stage", REPO / "stages" / "fetch_model.py")
    builtin = dict(TINY, steps=3, eval_every=None)
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"source": "builtin"}, "builtin": builtin}))
    monkeypatch.chdir(tmp_path)
    stage.main()
    report = json.loads((tmp_path / "metrics" / "builtin_train.json").read_text())
    assert "history" not in report and report["summary"]["max_cv"] >= 0
    curve = (tmp_path / "metrics" / "plots" / "builtin_train_loss.csv").read_text().splitlines()
    assert curve[0].startswith("step,lr,train_loss") and len(curve) == 1 + 3
    assert (tmp_path / "models" / "model" / "model.safetensors").is_file()


def test_fetch_model_stage_bad_params_exit_2(tmp_path, monkeypatch, capsys):
    stage = _load_script("fetch_model_stage2", REPO / "stages" / "fetch_model.py")
    (tmp_path / "params.yaml").write_text("builtin:\n  corpus_dir: no/such/dir\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        stage.main()
    assert e.value.code == 2
    assert "no/such/dir" in capsys.readouterr().err


FAMILIES = [("olmoe", {}), ("qwen2_moe", {"shared_experts": 2}),
            ("deepseek_moe", {"shared_experts": 2, "first_dense_layers": 1}),
            ("deepseek_v3", {"shared_experts": 1, "n_group": 2, "topk_group": 1})]


@pytest.mark.parametrize("family,extra", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_builtin_recipe_every_family(family, extra, tmp_path):
    """The recipe trains each builtin family for a few steps; the saved model reloads as that
    family, `romer inspect` describes it right, and the identity routing transform reproduces its
    logits. DeepSeek-V3's correction bias moved (aux-loss-free balancing) and was saved."""
    from romer.builtin.train import train_builtin
    from romer.moe.adapters import describe, get_adapter
    from romer.moe.models import load_model
    from romer.moe.routing import LayerRouting, routed

    cfg = BuiltinParams(**{**TINY, "family": family, "steps": 7, **extra})
    report = train_builtin(cfg, tmp_path / family, progress=False)
    assert math.isfinite(report["val_ppl"]) and report["val_ppl"] < cfg.vocab_size
    model = load_model(str(tmp_path / family), device="cpu")
    info = describe(model)
    want = {"olmoe": "olmoe", "qwen2_moe": "qwen2_moe", "deepseek_moe": "deepseek_v2", "deepseek_v3": "deepseek_v3"}
    assert info["family"] == want[family] and info["num_experts"] == cfg.num_experts and info["top_k"] == cfg.top_k
    assert info["shared_experts"] == {"olmoe": 0, "qwen2_moe": 1}.get(family, cfg.shared_experts)
    assert info["router"] == ("sigmoid" if family == "deepseek_v3" else "softmax")
    assert info["moe_layers"] == list(range(cfg.first_dense_layers, cfg.num_layers))
    assert (info["analog_params"]["dense_mlp"] > 0) == (cfg.first_dense_layers > 0)
    assert report["params"] == info["total_params"]
    if family == "deepseek_v3":
        bias = model.model.layers[0].mlp.gate.e_score_correction_bias
        assert bias.abs().max().item() > 0
    a = get_adapter(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with routed(model, a, {b.layer: LayerRouting(transform=lambda x: x) for b in a.blocks(model)}):
            got = model(input_ids=ids).logits
    assert (got - ref).abs().max().item() <= 1e-6


def test_family_params_are_checked():
    with pytest.raises(ValueError, match="needs shared_experts >= 1"):
        BuiltinParams(**{**TINY, "family": "qwen2_moe"})
    with pytest.raises(ValueError, match="divisible by n_group"):
        BuiltinParams(**{**TINY, "family": "deepseek_v3", "shared_experts": 1, "n_group": 3})
    with pytest.raises(ValueError, match="must be 0 for family olmoe"):
        BuiltinParams(**{**TINY, "shared_experts": 1})
    with pytest.raises(ValueError, match="first_dense_layers must be 0 for family qwen2_moe"):
        BuiltinParams(**{**TINY, "family": "qwen2_moe", "shared_experts": 1, "first_dense_layers": 1})
    with pytest.raises(ValueError, match="at least one layer must be MoE"):
        BuiltinParams(**{**TINY, "family": "deepseek_moe", "shared_experts": 1, "first_dense_layers": 2})
