import pytest
import torch
from deepseek_moe_mirror import Cfg, DeepseekForCausalLM
from tiny_models import FAMILIES, build

from romer.core.errors import UserError
from romer.moe.adapters import analog_tensors, describe, get_adapter
from romer.moe.routing import LayerRouting, Recorder, routed

ALL = list(FAMILIES) + ["deepseek_moe"]


def make(name):
    if name == "deepseek_moe":
        torch.manual_seed(0)
        return DeepseekForCausalLM(Cfg()).eval()
    return build(name)


def logits_of(model, ids):
    out = model(ids)
    return out if torch.is_tensor(out) else out.logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_inspect_counts(name):
    model = make(name)
    info = describe(model)
    assert info["family"] == name
    for k, v in FAMILIES[name][1].items():
        assert info[k] == v, (k, info[k], v)
    ap = info["analog_params"]
    assert ap["router"] == len(v := info["moe_layers"]) * info["num_experts"] * model.config.hidden_size
    assert ap["routed_experts"] > 0 and ap["attention"] > 0
    assert (ap["shared_experts"] > 0) == (info["shared_experts"] > 0)


def test_inspect_deepseek_moe_layout():
    info = describe(make("deepseek_moe"))
    assert info["family"] == "deepseek_moe"
    assert info["moe_layers"] == [1, 2] and info["num_experts"] == 8 and info["top_k"] == 2
    assert info["shared_experts"] == 2 and info["router"] == "softmax"
    # 8 experts x 3 Linear(32x16) per MoE layer, 2 MoE layers
    assert info["analog_params"]["routed_experts"] == 2 * 8 * 3 * 32 * 16
    assert info["analog_params"]["dense_mlp"] == 3 * 32 * 64


@pytest.mark.parametrize("name", ALL)
def test_identity_transform_reproduces_model(name, ids):
    model = make(name)
    a = get_adapter(model)
    with torch.no_grad():
        ref = logits_of(model, ids)
        plan = {b.layer: LayerRouting(transform=lambda x: x) for b in a.blocks(model)}
        with routed(model, a, plan):
            got = logits_of(model, ids)
    assert (got - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", ALL)
def test_plus_100_sends_every_token_to_expert_0(name, ids):
    model = make(name)
    a = get_adapter(model)
    for n, buf in model.named_buffers():
        # A sigmoid score saturates at 1, so a positive correction bias on another expert could still
        # outrank a +100 logit; the bias itself is covered by the identity test above.
        if n.endswith("e_score_correction_bias"):
            buf.zero_()
    for b in a.blocks(model):
        # Likewise a saturated sigmoid cannot lift its group past groups of two strong experts, so
        # group-limited top-k could exclude expert 0's group; route ungrouped for this test.
        if a.router_kind == "sigmoid":
            b.router.num_group = b.router.topk_group = 1

    def boost(x):
        x = x.clone()
        x[:, 0] += 100
        return x

    rec = Recorder(indices=True)
    with torch.no_grad():
        ref = logits_of(model, ids)
        with routed(model, a, {b.layer: LayerRouting(transform=boost) for b in a.blocks(model)}, rec):
            got = logits_of(model, ids)
    for layer, chunks in rec.indices.items():
        idx = torch.cat(chunks).long()
        assert (idx == 0).any(dim=1).all(), f"layer {layer}: not every token chose expert 0"
    assert (got - ref).abs().max().item() > 1e-4


@pytest.mark.parametrize("name", ALL)
def test_analog_kinds_partition(name):
    model = make(name)
    a = get_adapter(model)
    names = {}
    for kind in ("routed_experts", "shared_experts", "attention", "router", "dense_mlp"):
        for r in analog_tensors(model, a, [kind]):
            assert r.kind == kind and r.tensor.dim() >= 2 and r.layer is not None and r.part
            assert r.name not in names
            names[r.name] = r.tensor
    ptrs = {t.data_ptr() for t in names.values()}
    emb = model.model.embed_tokens.weight.data_ptr()
    assert emb not in ptrs and model.lm_head.weight.data_ptr() not in ptrs


@pytest.mark.parametrize("name", ALL)
def test_expert_tensors_are_writable_views(name):
    model = make(name)
    a = get_adapter(model)
    b = a.blocks(model)[0]
    src = [t.clone() for _, t in a.expert_tensors(b, 1)]
    for (_, dst), s in zip(a.expert_tensors(b, 0), src):
        dst.copy_(s)
    for (p0, t0), (p1, t1) in zip(a.expert_tensors(b, 0), a.expert_tensors(b, 1)):
        assert p0 == p1 and torch.equal(t0, t1)


def test_dense_model_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UserError, match="unsupported model family 'llama'"):
        get_adapter(m)


def test_moe_type_without_moe_blocks_refused():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    m = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                           mlp_only_layers=[0, 1]))
    with pytest.raises(UserError, match="no MoE blocks"):
        get_adapter(m)


def test_inspect_cli_on_saved_model(tmp_path, capsys):
    import json

    from romer.cli import main

    model = make("qwen2_moe")
    model.save_pretrained(tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "qwen2_moe" and info["moe_layers"] == [0, 2] and info["shared_experts"] == 1
    assert main(["inspect", str(tmp_path / "m")]) == 0
    assert "qwen2_moe" in capsys.readouterr().out


def test_inspect_cli_refuses_dense_and_bad_sources(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from romer.cli import main

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "dense")
    assert main(["inspect", str(tmp_path / "dense"), "--json"]) == 2
    assert "unsupported model family 'llama'" in capsys.readouterr().err
    assert main(["inspect", "some-org/some-moe-model"]) == 2  # offline: the hub is unreachable
    err = capsys.readouterr().err
    assert "some-org/some-moe-model" in err and "unreachable" in err and "model.source" in err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "no config.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    make("olmoe").save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["inspect", str(broken)]) == 2
    assert "cannot load weights" in capsys.readouterr().err


def test_device_map_auto_loads_on_cpu(tmp_path, ids):
    """model.device_map: auto (accelerate) places a model on what there is, here the CPU, and the
    evaluation path gives the same NLL as the plain load."""
    from romer.evaluation.measure import nll_pass
    from romer.moe.models import input_device, load_model

    make("olmoe").save_pretrained(tmp_path / "m")
    plain = load_model(str(tmp_path / "m"), device="cpu")
    mapped = load_model(str(tmp_path / "m"), device_map="auto")
    assert input_device(mapped).type == "cpu"
    a = nll_pass(plain, get_adapter(plain), ids, 2, "cpu")
    b = nll_pass(mapped, get_adapter(mapped), ids, 2, input_device(mapped))
    assert a[1] == b[1] and abs(a[0] - b[0]) < 1e-4 * abs(a[0])


@pytest.mark.parametrize("name", list(FAMILIES))  # the deepseek_moe mirror has no HF forward signature
def test_chunked_nll_equals_full_logits(name, ids):
    """nll_pass takes the NLL from chunked lm_head logits where a family's logits are lm_head(decoder);
    it must equal the cross-entropy of the model's own logits."""
    import torch.nn.functional as F

    from romer.evaluation.measure import nll_pass

    model = make(name)
    total, count = nll_pass(model, get_adapter(model), ids, 1, "cpu")
    with torch.no_grad():
        logits = logits_of(model, ids)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()
    assert count == ids[:, 1:].numel()
    assert abs(total - ref) < 1e-4 * abs(ref)
