"""Load-balance and routing-agreement metrics, from top-k expert indices.

All functions take plain tensors so they can be tested on hand-made routing counts.
"""

from __future__ import annotations

import math

import torch


def expert_load(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of top-k selections that went to each expert. topk_idx: [tokens, k] -> [E]."""
    counts = torch.bincount(topk_idx.reshape(-1).long(), minlength=num_experts)[:num_experts].double()
    return counts / counts.sum().clamp_min(1)


def load_stats(load: torch.Tensor, tau: float = 0.25) -> dict:
    """CV, MaxVio, normalised entropy and underactivated fraction of one layer's load vector."""
    load = load.double()
    E = load.numel()
    mean = load.mean()
    p = load / load.sum().clamp_min(1e-30)
    ent = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "cv": (load.std(unbiased=False) / mean).item(),
        "maxvio": (load.max() / mean - 1).item(),
        "entropy": ent / math.log(E) if E > 1 else 1.0,
        "underactivated_frac": (load < tau / E).double().mean().item(),
    }


def jaccard_agreement(idx_a: torch.Tensor, idx_b: torch.Tensor, num_experts: int) -> float:
    """Mean over tokens of |A & B| / |A | B| for the top-k sets of two routings ([tokens, k] each)."""
    a = torch.zeros(idx_a.shape[0], num_experts + 1, dtype=torch.bool, device=idx_a.device)
    b = torch.zeros_like(a)
    a.scatter_(1, idx_a.long(), True)
    b.scatter_(1, idx_b.long(), True)
    a, b = a[:, :num_experts], b[:, :num_experts]
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double().clamp_min(1)
    return (inter / union).mean().item()


def topk_changed_frac(idx_a: torch.Tensor, idx_b: torch.Tensor) -> float:
    """Fraction of tokens whose top-k expert set differs between two routings ([tokens, k] each;
    the order within a set does not matter)."""
    a, b = idx_a.long().sort(dim=1).values, idx_b.long().sort(dim=1).values
    return (a != b).any(dim=1).double().mean().item()


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> float:
    """KL(p || q) of two load vectors, smoothed by eps so empty experts stay finite."""
    p = p.double() + eps
    q = q.double() + eps
    p, q = p / p.sum(), q / q.sum()
    return (p * (p / q).log()).sum().item()


def summarize_layers(per_layer: list[dict]) -> dict:
    """Mean of each metric over layers (per_layer: list of dicts with the same numeric keys)."""
    if not per_layer:
        return {}
    keys = [k for k, v in per_layer[0].items() if isinstance(v, (int, float))]
    return {k: sum(d[k] for d in per_layer) / len(per_layer) for k in keys}
