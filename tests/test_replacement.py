import torch

from romer.core.records import AnalogTensor
from romer.methods.replacement import make_plan, routing_fns, weight_edit


def test_plan_on_constructed_profile():
    E = 8  # fair share 0.125; tau 0.25 -> underactivated below 0.03125
    load = {0: [0.30, 0.20, 0.01, 0.15, 0.02, 0.12, 0.10, 0.10],
            1: [0.125] * 8}
    plan = make_plan(load, tau=0.25, max_per_layer=2, strategy="copy_router")
    assert plan["layers"]["0"] == [
        {"slot": 2, "source": 0, "slot_load": 0.01, "source_load": 0.30},
        {"slot": 4, "source": 1, "slot_load": 0.02, "source_load": 0.20},
    ]
    assert plan["layers"]["1"] == [] and plan["replaced"] == 2
    capped = make_plan(load, tau=0.25, max_per_layer=1, strategy="split")
    assert [p["slot"] for p in capped["layers"]["0"]] == [2]
    assert make_plan(load, tau=0.0, max_per_layer=4, strategy="split")["replaced"] == 0


def test_weight_edit_copies_source_expert_and_router_row():
    plan = make_plan({3: [0.5, 0.0, 0.25, 0.25]}, tau=0.25, max_per_layer=1, strategy="copy_router")
    edit = weight_edit(plan)
    experts = torch.randn(4, 6, 5)
    router = torch.randn(4, 5)
    before = experts.clone()
    edit(AnalogTensor("layers.3.mlp.experts.gate_up_proj", "routed_experts", experts, layer=3, part="gate_up_proj"))
    edit(AnalogTensor("layers.3.mlp.gate.weight", "router", router, layer=3, part="weight"))
    assert torch.equal(experts[1], before[0]) and torch.equal(experts[2:], before[2:])
    assert torch.equal(router[1], router[0])
    other = torch.randn(4, 6, 5)
    ref = other.clone()
    edit(AnalogTensor("layers.2.mlp.experts.gate_up_proj", "routed_experts", other, layer=2))  # layer without a plan
    assert torch.equal(other, ref)


def test_weight_edit_per_expert_layout_reads_the_source_experts_clean_copy():
    """Per-expert Linear layouts (DeepSeek-MoE remote code): the slot's tensor gets the clean tensor
    of the same part of the source expert, found by place, not by parsing names."""
    plan = make_plan({1: [0.5, 0.0, 0.25, 0.25]}, tau=0.25, max_per_layer=1, strategy="split")
    src = torch.randn(6, 5)
    asked = []

    def clean_at(kind, layer, part, expert):
        asked.append((kind, layer, part, expert))
        return src

    slot = torch.zeros(6, 5)
    edit = weight_edit(plan, clean_at)
    edit(AnalogTensor("x", "routed_experts", slot, layer=1, part="down_proj.weight", expert=1))
    assert torch.equal(slot, src) and asked == [("routed_experts", 1, "down_proj.weight", 0)]
    other = torch.zeros(6, 5)
    edit(AnalogTensor("y", "routed_experts", other, layer=1, part="down_proj.weight", expert=2))
    assert not other.any() and len(asked) == 1


def test_split_and_average_routing():
    pairs = [(1, 0)]  # slot 1 replicates expert 0
    logits = torch.tensor([[5.0, 4.0, 0.0, 1.0]] * 4)
    mask, post = routing_fns(pairs, "split", 4)
    masked = mask(logits)
    assert (masked[:, 1] < -1e30).all()
    w = torch.full((4, 2), 0.5)
    idx = torch.tensor([[0, 3]] * 4)
    _, new_idx = post(w, idx, masked)
    assert new_idx[:, 0].tolist() == [0, 1, 0, 1]  # hot expert's tokens alternate with the replica
    mask, post = routing_fns(pairs, "average", 4)
    idx = torch.tensor([[0, 3], [2, 3]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    nw, ni = post(w, idx, logits[:2])
    assert ni.tolist() == [[0, 3, 1], [2, 3, 4]]  # 4 = sentinel (no expert) for tokens without expert 0
    assert torch.allclose(nw, torch.tensor([[0.3, 0.4, 0.3], [0.7, 0.3, 0.0]]))
    assert routing_fns(pairs, "copy_router", 4) == (None, None)


def test_split_mask_excludes_slot_under_sigmoid_router_with_correction_bias():
    """DeepSeek-V3 adds the correction bias after the sigmoid, so a masked logit alone would leave the
    replica slot selectable when its bias is large; the adapter must still never pick it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import build

    from romer.moe.adapters import get_adapter

    model = build("deepseek_v3")
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    router = block.router
    E = adapter.num_experts(block)
    slot = 3
    router.e_score_correction_bias.zero_()
    router.e_score_correction_bias[slot] = 5.0  # far above any sigmoid score + bias of the others
    logits = torch.randn(64, E, generator=torch.Generator().manual_seed(0))
    assert (adapter.route(router, logits)[1] == slot).any(1).all()  # without the mask: always picked
    mask, _ = routing_fns([(slot, 0)], "split", E)
    _, idx = adapter.route(router, mask(logits))
    assert not (idx == slot).any()


def test_average_strategy_sentinel_is_safe_with_grouped_mm():
    """`average` pads tokens without the hot expert with a sentinel index (no expert, weight 0).
    transformers' grouped_mm leaves sentinel rows uninitialised, so the hook must hand the model a
    real expert at weight 0 instead; the output must equal the eager kernel's, which skips them."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import build

    from romer.methods.calibration import compose
    from romer.moe.adapters import get_adapter
    from romer.moe.routing import Recorder, routed

    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(3))
    outs = {}
    for impl in ("eager", "grouped_mm"):
        model = build("olmoe")
        model.set_experts_implementation(impl)
        adapter = get_adapter(model)
        blocks = adapter.blocks(model)
        E = adapter.num_experts(blocks[0])
        rplan = {b.layer: compose(None, *routing_fns([(1, 0)], "average", E)) for b in blocks}
        rec = Recorder(indices=True)
        with torch.no_grad(), routed(model, adapter, rplan, rec):
            outs[impl] = model(ids).logits
        assert (rec.cat_indices(blocks[0].layer) == E).any()  # the recorder keeps the sentinel
    assert torch.isfinite(outs["grouped_mm"]).all()
    assert torch.allclose(outs["eager"], outs["grouped_mm"], atol=1e-4)


def test_least_noisy_placement_puts_copies_on_the_best_arrays():
    from romer.methods.replacement import make_plan

    load = {0: [0.30, 0.30, 0.20, 0.10, 0.04, 0.03, 0.02, 0.01]}  # tau 0.5: experts 4-7 are cold (< 1/16)
    noise = {0: [1.0, 1.0, 1.0, 1.0, 0.7, 1.3, 0.9, 1.5]}
    cold = make_plan(load, 0.5, 2, "split")
    assert [(p["slot"], p["source"]) for p in cold["layers"]["0"]] == [(7, 0), (6, 1)] and cold["placement"] == "coldest"
    best = make_plan(load, 0.5, 2, "split", slot_noise=noise, placement="least_noisy")
    # the two cold slots on the least noisy arrays (4: 0.7, 6: 0.9), the hottest copy on the best one
    assert [(p["slot"], p["source"]) for p in best["layers"]["0"]] == [(4, 0), (6, 1)]
    assert make_plan(load, 0.5, 2, "split", placement="least_noisy")["placement"] == "coldest"  # no chip model


def test_expert_array_noise_follows_the_chip_variation():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import build

    from romer.cim.noise_models import pcm_joshi2020
    from romer.core.params import Params
    from romer.pipeline.experiment import Experiment

    model = build("olmoe")
    exp = Experiment(Params(cim={"variation": {"sigma_spread": 0.3}}), model=model, noise_model=pcm_joshi2020())
    a, again, other = exp.expert_array_noise(3), exp.expert_array_noise(3), exp.expert_array_noise(4)
    assert a == again and a != other  # seeded per chip
    assert set(a) == set(exp.layers) and all(len(v) == exp.num_experts for v in a.values())
    vals = torch.tensor([x for v in a.values() for x in v])
    assert vals.std() > 0.05 and (vals > 0).all()  # lognormal multipliers of sigma 0.3, averaged over 2 parts
    assert Experiment(Params(), model=model, noise_model=pcm_joshi2020()).expert_array_noise(3) is None
