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
