"""Competitor baseline: heterogeneous analog-digital MoE (Chowdhury, Tsai, Burr et al., arXiv 2603.02633).

The noise-sensitive experts stay digital (unperturbed); they are the experts with the largest
maximum neuron norm. The attention layers stay digital as well. Our reading of "neuron norm"
(a choice of this project): for intermediate neuron n of an expert, the L2 norm of all its weights,
i.e. its gate and up rows and its down column; an expert's score is the max over its neurons.
"""

from __future__ import annotations

import math

import torch


def expert_max_neuron_norm(named_tensors) -> float:
    """named_tensors: [(name, tensor)] of one expert; 'down' tensors are [H, I] (neurons = columns),
    the others [k*I, H] (neurons = rows, k = 2 for a fused gate_up)."""
    down = [t for n, t in named_tensors if "down" in n]
    inter = down[0].shape[-1]
    acc = torch.zeros(inter, dtype=torch.float64)
    for name, t in named_tensors:
        t = t.detach().double().cpu()
        if "down" in name:
            acc += (t ** 2).sum(0)
        else:
            acc += (t ** 2).sum(-1).view(-1, inter).sum(0)
    return acc.sqrt().max().item()


def sensitive_experts(adapter, model, fraction: float) -> dict:
    """{layer: [expert indices]}: the ceil(fraction * E) experts per MoE layer with the largest
    maximum neuron norm (computed on the clean weights)."""
    out = {}
    for b in adapter.blocks(model):
        names = [n for n, _ in adapter.expert_param_tensors(b)]
        E = adapter.num_experts(b)
        k = min(E, math.ceil(fraction * E - 1e-9))
        if k <= 0:
            out[b.layer] = []
            continue
        scores = []
        for e in range(E):
            tensors = adapter.expert_tensors(b, e)
            named = list(zip(names, tensors)) if len(names) == len(tensors) else \
                [(f"{i}.{'down' if i == len(tensors) - 1 else 'in'}", t) for i, t in enumerate(tensors)]
            scores.append(expert_max_neuron_norm(named))
        out[b.layer] = sorted(int(i) for i in torch.tensor(scores).argsort(descending=True)[:k])
    return out
