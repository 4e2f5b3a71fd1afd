"""Competitor baseline: heterogeneous analog-digital MoE (Chowdhury, Tsai, Burr et al., arXiv 2603.02633).

The noise-sensitive experts stay digital (unperturbed); they are the experts with the largest
maximum neuron norm. The attention layers stay digital as well. Our reading of "neuron norm"
(a choice of this project): for intermediate neuron n of an expert, the L2 norm of all its weights,
i.e. its gate and up rows and its down column; an expert's score is the max over its neurons.
"""

from __future__ import annotations

import math

import torch


def expert_max_neuron_norm(parts) -> float:
    """parts: [(part, tensor)] of one expert (Adapter.expert_tensors). The down projection (part
    `down_proj...`) is [H, I], neurons are its columns; the others are [k*I, H], neurons are rows
    (k = 2 for a fused gate_up)."""
    down = [t for part, t in parts if part.startswith("down")]
    if len(down) != 1:
        raise ValueError(f"expected one down projection among the expert's parts {[p for p, _ in parts]}")
    inter = down[0].shape[-1]
    acc = torch.zeros(inter, dtype=torch.float64)
    for part, t in parts:
        t = t.detach().double().cpu()
        if part.startswith("down"):
            acc += (t ** 2).sum(0)
        else:
            acc += (t ** 2).sum(-1).view(-1, inter).sum(0)
    return acc.sqrt().max().item()


def sensitive_experts(adapter, model, fraction: float) -> dict:
    """{layer: [expert indices]}: the ceil(fraction * E) experts per MoE layer with the largest
    maximum neuron norm (computed on the clean weights)."""
    out = {}
    for b in adapter.blocks(model):
        E = adapter.num_experts(b)
        k = min(E, math.ceil(fraction * E - 1e-9))
        if k <= 0:
            out[b.layer] = []
            continue
        scores = [expert_max_neuron_norm(adapter.expert_tensors(b, e)) for e in range(E)]
        out[b.layer] = sorted(int(i) for i in torch.tensor(scores).argsort(descending=True)[:k])
    return out
