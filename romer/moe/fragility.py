"""What makes an MoE model's routing fragile under analog noise, measured per MoE layer.

- weight statistics of the routed experts and the attention: excess kurtosis (0 for a Gaussian;
  heavy tails raise it) and abs-max / rms of each weight row (a row is what one row-wise mapping
  scales to the conductance range, so a high crest leaves the typical weight few conductance
  levels);
- the router margin: the gap between the k-th and the (k+1)-th largest router logit of each
  token, raw and relative to the spread (std over experts) of that token's logits. A small
  margin is a near tie that a little noise flips;
- the fraction of tokens whose top-k expert set changes under the noise (any member differs).

`fragility_report` measures all three on one loaded Experiment; beyond/dvc.yaml's `fragility`
stage runs it for the default model and each family (metrics/fragility.json).
"""

from __future__ import annotations

import torch

from romer.core import numerics
from romer.moe.adapters import analog_tensors
from romer.moe.routing import Recorder
from romer.moe.routing_metrics import topk_changed_frac


def excess_kurtosis(x: torch.Tensor) -> float:
    """Fisher's excess kurtosis E[(x - mu)^4] / var^2 - 3 of all elements (float64)."""
    x = x.detach().reshape(-1).double()
    d = x - x.mean()
    var = d.pow(2).mean()
    return float(d.pow(4).mean() / var.pow(2) - 3) if var > 0 else float("nan")


def row_crest(w: torch.Tensor) -> torch.Tensor:
    """abs-max / rms of every row (the last dim is the input) of a [..., out, in] weight."""
    rows = w.detach().reshape(-1, w.shape[-1]).double()
    rms = numerics.sqrt(rows.pow(2).mean(dim=1))
    keep = rms > 0
    return rows.abs().amax(dim=1)[keep] / rms[keep]


def _stats(tensors) -> dict:
    if not tensors:
        return {}
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    crest = torch.cat([row_crest(t) for t in tensors])
    return {"kurtosis": round(excess_kurtosis(flat), 4),
            "row_crest_median": round(float(crest.median()), 4),
            "row_crest_max": round(float(crest.max()), 4)}


def weight_fragility(model, adapter) -> dict:
    """{layer: {"experts": {...}, "attention": {...}}} kurtosis and row crest per MoE layer."""
    out = {}
    for b in adapter.blocks(model):
        experts = [r.tensor for r in analog_tensors(model, adapter, ["routed_experts"]) if r.layer == b.layer]
        attn = [r.tensor for r in analog_tensors(model, adapter, ["attention"]) if r.layer == b.layer]
        out[b.layer] = {"experts": _stats(experts), "attention": _stats(attn)}
    return out


def margin_stats(logits: torch.Tensor, k: int) -> dict:
    """Median over tokens of the k-th minus (k+1)-th largest logit, raw and over the token's logit std."""
    top = logits.float().topk(k + 1, dim=-1).values
    gap = top[:, k - 1] - top[:, k]
    rel = gap / logits.float().std(dim=-1).clamp_min(1e-12)
    return {"margin_median": round(float(gap.median()), 5), "margin_rel_median": round(float(rel.median()), 5),
            "near_tie_frac": round(float((rel < 0.05).double().mean()), 5)}


@torch.no_grad()
def fragility_report(exp, windows, seeds) -> dict:
    """Per MoE layer of `exp`'s model: weight statistics, clean router margins on `windows`, and the
    fraction of tokens whose top-k set changes on each chip of `seeds` (mean over the chips)."""
    from romer.evaluation.measure import perplexity

    bs = exp.params.eval.batch_size
    exp.set_state(None)
    clean = Recorder(logits=True, indices=True)
    clean_ppl = perplexity(exp.model, exp.adapter, windows, bs, exp.device, None, clean, desc="fragility clean")
    weights = weight_fragility(exp.model, exp.adapter)
    changed = {layer: [] for layer in exp.layers}
    noisy_ppl = []
    for s in seeds:
        exp.set_state(s)
        rec = Recorder(indices=True)
        noisy_ppl.append(perplexity(exp.model, exp.adapter, windows, bs, exp.device, None, rec,
                                    desc=f"fragility chip {s}"))
        for layer in exp.layers:
            changed[layer].append(topk_changed_frac(rec.cat_indices(layer), clean.cat_indices(layer)))
    exp.restore()
    layers = []
    for layer in exp.layers:
        layers.append({"layer": layer, **{f"{part}_{k}": v for part, st in weights[layer].items() for k, v in st.items()},
                       **margin_stats(clean.cat_logits(layer), exp.top_k),
                       "topk_changed_frac": round(sum(changed[layer]) / len(seeds), 5)})
    keys = [k for k in layers[0] if k != "layer"]
    mean = {k: round(sum(d[k] for d in layers) / len(layers), 5) for k in keys}
    return {"top_k": exp.top_k, "num_experts": exp.num_experts, "tokens": int(windows.numel()),
            "seeds": list(seeds), "clean_ppl": clean_ppl, "noisy_ppl_mean": sum(noisy_ppl) / len(noisy_ppl),
            "layers": layers, "mean": mean}
