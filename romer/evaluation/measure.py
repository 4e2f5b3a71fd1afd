"""Perplexity passes with routing hooks, load-balance metrics per method, and seed statistics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from romer.core.lm_loss import chunked_lm_loss
from romer.moe.routing import Recorder, routed
from romer.moe.routing_metrics import expert_load, jaccard_agreement, kl_divergence, load_stats, summarize_layers

# Two-sided 97.5% quantiles of Student's t for df = 1..30 (beyond: normal 1.96).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def mean_ci(values) -> dict:
    """Mean, sample std and the 95% t-interval of the mean, plus the values themselves."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "per_seed": v}


def paired_reduction(noisy, repaired) -> tuple[float, list]:
    """Percent reduction of the mean, with a 95% CI from the paired per-seed differences."""
    base = sum(noisy) / len(noisy)
    diffs = [100.0 * (a - b) / base for a, b in zip(noisy, repaired)]
    s = mean_ci(diffs)
    return 100.0 * (base - sum(repaired) / len(repaired)) / base, s["ci95"]


def _plain_lm_head(model):
    """(decoder, lm_head) when the causal LM's logits are exactly lm_head(decoder(x)) (every supported
    MoE family), else None (logit scaling or soft-capping: use the model's own logits)."""
    cfg = getattr(model, "config", None)
    if any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")):
        return None
    from transformers import PreTrainedModel

    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if isinstance(decoder, PreTrainedModel) and isinstance(head, torch.nn.Linear):
        return decoder, head
    return None


def nll_pass(model, adapter, windows, batch_size, device, plan=None, recorder=None, desc=None):
    """Summed next-token NLL and token count over the windows, with a routing plan active.

    The NLL is taken from the decoder's hidden states with chunked lm_head logits: the full
    [batch, seq, vocab] logits of a plain forward are never built, which made the evaluation path
    1.4x faster on CPU for the builtin model (benchmarks/eval_overhead.py).
    """
    total, count = 0.0, 0
    it = range(0, windows.shape[0], batch_size)
    split = _plain_lm_head(model)
    with torch.no_grad(), routed(model, adapter, plan, recorder):
        for i in tqdm(it, desc=desc, leave=False, disable=desc is None):
            x = windows[i:i + batch_size].to(device)
            if split is not None:
                hidden = split[0](input_ids=x, use_cache=False).last_hidden_state
                loss = chunked_lm_loss(split[1], hidden[:, :-1], x[:, 1:], reduction="sum")
            else:
                logits = model(x, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
            total += loss.item()
            count += x[:, 1:].numel()
    return total, count


def perplexity(model, adapter, windows, batch_size, device, plan=None, recorder=None, desc=None) -> float:
    total, count = nll_pass(model, adapter, windows, batch_size, device, plan, recorder, desc)
    return math.exp(total / count)


def routing_report(rec: Recorder, num_experts: int, tau: float, clean: Recorder | None = None,
                   aliases: dict | None = None) -> dict:
    """Per-layer load metrics (and agreement/KL against a clean recording) plus their layer mean.

    aliases {layer: [(slot, source)]}: a replica computes its source's function, so for routing
    agreement a token sent to the replica counts as sent to the source.
    """
    per_layer = {}
    for layer in sorted(rec.indices):
        idx = rec.cat_indices(layer)
        idx = idx.clamp(max=num_experts)  # sentinel columns (replica averaging) count as nothing
        load = expert_load(idx[idx < num_experts].view(-1, 1), num_experts)
        d = load_stats(load, tau)
        if clean is not None:
            cidx = clean.cat_indices(layer)
            same = idx[:, : cidx.shape[1]].clone()
            for slot, src in (aliases or {}).get(layer, []):
                same[same == slot] = src
            d["routing_agreement"] = jaccard_agreement(same, cidx, num_experts)
            d["kl_clean_noisy"] = kl_divergence(expert_load(cidx, num_experts), load)
        d["load"] = load.tolist()
        per_layer[str(layer)] = d
    return {"layers": per_layer, "mean": summarize_layers(list(per_layer.values()))}
