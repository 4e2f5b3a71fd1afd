"""Zero-shot tasks through lm-eval's HFLM on an in-memory tiny OLMoE (romer.evaluation.tasks)."""

import json
import random

import pytest
import torch

from romer.cim.noise_models import gaussian
from romer.core.errors import UserError
from romer.core.params import Params
from romer.evaluation.tasks import LOCAL_TASKS, build_cloze, evaluate_tasks, load_tasks, write_local_task
from romer.methods.calibration import collect_logits, percentiles
from romer.pipeline.experiment import Experiment

WORDS = ("love death crown sword night king queen heart blood honour fair foul sweet noble gentle "
         "lord lady tongue grave heaven earth fortune duke sleep dream ghost storm").split()


def play_text(n_speeches=240, seed=0):
    """Synthetic play-like text: speaker tags, verse lines, blank lines between speeches."""
    rng = random.Random(seed)
    out = []
    for s in range(n_speeches):
        out.append(rng.choice(["HAMLET.", "OPHELIA.", "KING.", "QUEEN."]))
        for _ in range(rng.randint(3, 7)):
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10))).capitalize() + ",")
        out.append("")
    return "\n".join(out) + "\n"


def test_build_cloze_is_deterministic_and_well_formed():
    text = play_text()
    items = build_cloze(text, n_items=50)
    assert items == build_cloze(text, n_items=50)
    assert len(items) == 50
    lines = text.split("\n")
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert it["choices"][it["label"]] == lines[it["line"]].strip()
        assert it["context"].split("\n") == [ln.strip() for ln in lines[it["line"] - 4: it["line"]]]
        assert it["context"].split("\n")[-1]  # no blank line inside the context
    # The true line sits in every position (not always first).
    assert len({it["label"] for it in items}) == 4
    with pytest.raises(UserError, match="too short"):
        build_cloze("a\nb\n")


# ---- a tiny model, tokenizer and corpus, and an Experiment-like wrapper -------------------------
def tiny_tokenizer(text):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)


def tiny_model(tokenizer):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = OlmoeForCausalLM(cfg).eval()
    for n, p in model.named_parameters():
        if n.endswith("mlp.gate.weight"):
            p.data.normal_(0, 2.0 / p.shape[1] ** 0.5)
    return model


class RecordingExperiment(Experiment):
    """The real Experiment on an in-memory tiny OLMoE; it records the weight states it is put in."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.states = []

    def set_state(self, seed=None, plan=None, **kw):
        self.states.append((seed, bool(plan)))
        super().set_state(seed, plan, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    corpus = tmp / "corpus"
    corpus.mkdir()
    text = play_text()
    (corpus / "play.txt").write_text(text)
    params = Params(builtin={"corpus_dir": str(corpus), "test_frac": 0.3, "val_frac": 0.05, "split_chunks": 1},
                    eval={"seeds": [0, 1], "batch_size": 8}, noise={"prog_scale": 1.0, "read_scale": 1.0},
                    cim={"analog": ["routed_experts", "router"]}, calib={"batch_size": 4})
    tok = tiny_tokenizer(text)
    exp = RecordingExperiment(params, model=tiny_model(tok), tokenizer=tok, noise_model=gaussian(0.3))
    exp.model.config.output_router_logits = True  # evaluate_tasks must switch it off while lm-eval runs
    calib_w = torch.tensor(exp.tokenizer(text[:20000])["input_ids"][: 8 * 64]).view(8, 64)
    exp.set_state(None)
    got = collect_logits(exp.model, exp.adapter, calib_w, 4, "cpu")
    clean = {str(k): percentiles(v, *params.calibrate.percentiles).tolist() for k, v in got.items()}
    pct = {"clean": clean}
    plan = {"strategy": "copy_router", "tau": 0.25, "max_per_layer": 0, "layers": {}, "replaced": 0}
    exp.states.clear()
    return tmp, exp, plan, pct, calib_w


def test_local_task_loads_offline(setup):
    tmp, exp, *_ = setup
    from romer.data.corpus import builtin_splits

    d = write_local_task("builtin_cloze", builtin_splits(exp.params.builtin)["test"], tmp / "cache")
    assert write_local_task("builtin_cloze", builtin_splits(exp.params.builtin)["test"], tmp / "cache") == d
    cfg = json.loads((d / "builtin_cloze.yaml").read_text())
    assert cfg["dataset_path"] == "json" and cfg["output_type"] == "multiple_choice"
    td = load_tasks(["builtin_cloze"], exp.params.builtin, tmp / "cache")
    docs = list(td["tasks"]["builtin_cloze"].eval_docs)
    assert len(docs) == len((d / "builtin_cloze.jsonl").read_text().splitlines()) > 50
    assert set(docs[0]) >= {"context", "choices", "label"}


def test_evaluate_tasks_shape(setup, capsys, monkeypatch):
    import romer.evaluation.tasks

    tmp, exp, plan, pct, calib_w = setup
    seen, run = [], romer.evaluation.tasks.run_tasks
    monkeypatch.setattr(romer.evaluation.tasks, "run_tasks",
                        lambda *a, **k: seen.append(exp.model.config.output_router_logits) or run(*a, **k))
    clean = {int(k): torch.tensor(v, dtype=torch.float64) for k, v in pct["clean"].items()}
    states = {}
    for seed in (0, 1):
        exp.set_state(seed, plan)
        states[seed] = (plan, exp.calibrate(calib_w, clean, plan))
    exp.states.clear()
    out = evaluate_tasks(exp, ["builtin_cloze"], states, limit=24, root=tmp / "cache")
    assert seen == [False] * 5  # off while lm-eval runs (transformers crashes in generation otherwise)
    assert exp.model.config.output_router_logits is True  # restored afterwards
    assert list(out) == ["builtin_cloze"]
    r = out["builtin_cloze"]
    assert r["metric"] == "acc_mutual_info" and r["n_items"] == 24
    assert 0.0 <= r["clean"] <= 1.0
    for m in ("noisy", "romer"):
        assert set(r[m]) == {"mean", "std", "ci95", "per_seed"}
        assert len(r[m]["per_seed"]) == 2
        assert all(0.0 <= v <= 1.0 for v in r[m]["per_seed"])
    for m in ("acc", "acc_norm"):
        assert 0.0 <= r["all"][m]["clean"] <= 1.0 and len(r["all"][m]["romer"]["per_seed"]) == 2
    # clean, then per seed: noisy, romer (with the plan); the model is restored at the end
    assert exp.states == [(None, False), (0, False), (0, True), (1, False), (1, True)]
    log = capsys.readouterr().out
    assert "tasks: clean: builtin_cloze acc_mutual_info=" in log and "seed 1 romer (per_chip)" in log
    json.dumps(out)


def test_evaluate_tasks_expected_mode(setup):
    tmp, exp, plan, pct, calib_w = setup
    exp.params.calibrate.mode = "expected"
    exp.params.eval.seeds = [3]
    try:
        identity = {k: (torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))
                    for k in exp.layers}
        out = evaluate_tasks(exp, ["builtin_cloze"], {3: (plan, identity)}, limit=8, root=tmp / "cache")
    finally:
        exp.params.calibrate.mode = "per_chip"
        exp.params.eval.seeds = [0, 1]
    # identity maps: romer == noisy on the same instance (no replacement in this plan)
    assert out["builtin_cloze"]["romer"]["per_seed"] == out["builtin_cloze"]["noisy"]["per_seed"]


def test_unknown_task_names_the_task_and_the_local_tasks(setup):
    tmp, exp, plan, pct, calib_w = setup
    with pytest.raises(UserError) as e:
        evaluate_tasks(exp, ["builtin_cloze", "no_such_task_xyz"], {}, root=tmp / "cache")
    msg = str(e.value)
    assert "no_such_task_xyz" in msg and all(n in msg for n in LOCAL_TASKS)
