import torch
from tiny_models import build

from romer.methods.hetero import expert_max_neuron_norm, sensitive_experts
from romer.moe.adapters import get_adapter


def test_max_neuron_norm_by_hand():
    gate_up = torch.zeros(4, 3)  # I = 2 neurons, fused [gate; up] rows, H = 3 inputs
    down = torch.zeros(3, 2)
    gate_up[1, 0] = 3.0  # neuron 1, gate row
    gate_up[3, 1] = 4.0  # neuron 1, up row
    down[2, 0] = 1.0  # neuron 0, down column
    assert expert_max_neuron_norm([("gate_up_proj", gate_up), ("down_proj", down)]) == 5.0


def test_sensitive_experts_pick_the_largest_norms():
    model = build("olmoe")
    a = get_adapter(model)
    b = a.blocks(model)[0]
    with torch.no_grad():
        for _, t in a.expert_tensors(b, 5):
            t.mul_(10)  # expert 5 of layer 0 now has by far the largest neuron norm
    picks = sensitive_experts(a, model, 0.125)  # 8 experts -> 1 per layer
    assert picks[0] == [5] and len(picks[1]) == 1
    assert {len(v) for v in sensitive_experts(a, model, 0.25).values()} == {2}


def test_matched_budget_counts_experts_over_the_whole_model():
    """per_layer=False: round(fraction x all experts), ranked together, so a budget of a fraction of
    one expert per layer is not rounded up to a whole expert in every layer."""
    model = build("olmoe")
    a = get_adapter(model)
    blocks = a.blocks(model)
    with torch.no_grad():
        for _, t in a.expert_tensors(blocks[1], 3):
            t.mul_(10)
    total = sum(a.num_experts(b) for b in blocks)
    picks = sensitive_experts(a, model, 1 / total, per_layer=False)
    assert picks[blocks[1].layer] == [3] and sum(map(len, picks.values())) == 1
    assert sum(map(len, sensitive_experts(a, model, 1 / total).values())) == len(blocks)  # per layer: one each
    assert sum(map(len, sensitive_experts(a, model, 0.4 / total, per_layer=False).values())) == 0
