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
    return math.sqrt(acc.max().item())  # sqrt is monotone; math's is IEEE's on every CPU


def sensitive_experts(adapter, model, fraction: float, per_layer: bool = True) -> dict:
    """{layer: [expert indices]} kept digital, by the largest maximum neuron norm (on the clean weights).

    per_layer: ceil(fraction * E) experts in every MoE layer (the paper's fixed fractions). Otherwise
    round(fraction * all routed experts) experts over the whole model, ranked together: the budget
    matched to ROMER's, which rewrites a fraction of one expert per layer on average, and would be
    rounded up to a whole expert in every layer per layer.
    """
    scores = {}
    for b in adapter.blocks(model):
        scores[b.layer] = [expert_max_neuron_norm(adapter.expert_tensors(b, e)) for e in range(adapter.num_experts(b))]
    if per_layer:
        out = {}
        for layer, sc in scores.items():
            k = min(len(sc), math.ceil(fraction * len(sc) - 1e-9))
            out[layer] = sorted(int(i) for i in torch.tensor(sc).argsort(descending=True)[:k]) if k > 0 else []
        return out
    flat = sorted(((s, layer, e) for layer, sc in scores.items() for e, s in enumerate(sc)), key=lambda t: -t[0])
    n = round(fraction * len(flat))
    out = {layer: [] for layer in scores}
    for _, layer, e in flat[:n]:
        out[layer].append(e)
    return {layer: sorted(ex) for layer, ex in out.items()}
