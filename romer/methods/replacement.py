"""ROMER step 1: replace underactivated experts with copies of high-frequency ones.

The plan is made from the expert load profiled under noise: an expert with load < tau / E is
underactivated. Up to `max_per_layer` of them per layer (the coldest first) are reprogrammed with a
copy of a distinct hot expert's clean weights (the hottest first). The copy is a new physical array,
so it gets its own noise draw. With `placement: least_noisy` and a chip-level model of its arrays
(cim.variation), the slots are the underactivated experts whose arrays are the least noisy, and
the hottest expert's copy goes to the least noisy of them.

Router treatments (`replace.strategy`, a choice of this project; the paper does not fix it):
- copy_router: the slot also gets the hot expert's router row; the two compete in top-k as usual.
- split: the slot is never chosen by the router; the hot expert's tokens alternate between the hot
  expert and its replica (load balancing, as DeepSeek's EPLB redundant experts).
- average: the slot is never chosen by the router; every token that picks the hot expert uses the
  mean of the hot expert and its replica (two independent noise draws, averaged).
"""

from __future__ import annotations

import torch

STRATEGIES = ("copy_router", "split", "average")


PLACEMENTS = ("coldest", "least_noisy")


def make_plan(noisy_load: dict, tau: float, max_per_layer: int, strategy: str, slot_noise: dict | None = None,
              placement: str = "coldest") -> dict:
    """noisy_load: {layer: [E] load fractions} -> plan dict (JSON-serialisable).

    slot_noise: {layer: [E]} noise level of each expert's arrays (the chip's sigma multiplier),
    used by placement "least_noisy"; without it the placement is "coldest".
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}")
    if slot_noise is None:
        placement = "coldest"
    layers = {}
    for layer, load in sorted(noisy_load.items(), key=lambda kv: int(kv[0])):
        load = torch.as_tensor(load, dtype=torch.float64)
        E = load.numel()
        cold = [int(i) for i in torch.argsort(load) if load[i] < tau / E]
        if placement == "least_noisy":
            noise = torch.as_tensor(slot_noise[layer] if layer in slot_noise else slot_noise[str(layer)],
                                    dtype=torch.float64)
            cold = sorted(cold, key=lambda i: (float(noise[i]), float(load[i])))
        cold = cold[:max_per_layer]
        hot = [int(i) for i in torch.argsort(load, descending=True) if int(i) not in cold][: len(cold)]
        pairs = [
            {"slot": s, "source": h, "slot_load": float(load[s]), "source_load": float(load[h])}
            for s, h in zip(cold, hot)
            if load[h] > load[s]
        ]
        layers[str(layer)] = pairs
    return {
        "strategy": strategy,
        "placement": placement,
        "tau": tau,
        "max_per_layer": max_per_layer,
        "layers": layers,
        "replaced": sum(len(v) for v in layers.values()),
    }


def pairs_by_layer(plan) -> dict:
    """{layer index: [(slot, source), ...]} for layers that replace something."""
    return {int(k): [(p["slot"], p["source"]) for p in v] for k, v in plan["layers"].items() if v}


def weight_edit(plan, clean_at=None):
    """An `edit(record)` for AnalogWeights.apply: reprogram each slot with its source's clean weights
    (and, for copy_router, its router row) before the noise draw.

    Fused expert tensors [E, out, in] are edited in place from their own (still clean) rows. For
    per-expert layouts, `clean_at(kind, layer, part, expert)` returns another expert's clean tensor
    (AnalogWeights.clean_at).
    """
    pairs = pairs_by_layer(plan)
    copy_router = plan["strategy"] == "copy_router"

    def edit(rec):
        todo = pairs.get(rec.layer)
        if not todo:
            return
        t = rec.tensor
        if rec.kind == "routed_experts":
            for slot, src in todo:
                if rec.fused:
                    t[slot].copy_(t[src])
                elif rec.expert == slot:
                    t.copy_(clean_at(rec.kind, rec.layer, rec.part, src))
        elif rec.kind == "router" and copy_router:
            for slot, src in todo:
                t[slot].copy_(t[src])

    return edit


def routing_fns(pairs, strategy: str, num_experts: int):
    """(logit_mask, post) for one layer; either may be None.

    logit_mask: logits -> logits with the replica slots excluded from top-k (split, average).
    post: (weights, indices, logits) -> (weights, indices) redistributing the hot expert's tokens.
    """
    if not pairs or strategy == "copy_router":
        return None, None
    slots = torch.tensor([s for s, _ in pairs])

    def logit_mask(logits):
        # -inf, not the dtype's min: sigmoid routers (DeepSeek-V3) add a correction bias after the
        # sigmoid, so their adapter excludes -inf logits explicitly; softmax gives them weight 0.
        logits = logits.clone()
        logits[:, slots.to(logits.device)] = float("-inf")
        return logits

    if strategy == "split":

        def post(weights, indices, logits):
            indices = indices.clone()
            odd = (torch.arange(indices.shape[0], device=indices.device) % 2 == 1)[:, None]
            for slot, src in pairs:
                indices[(indices == src) & odd] = slot
            return weights, indices

        return logit_mask, post

    def post(weights, indices, logits):  # average
        extra_w, extra_i = [], []
        weights = weights.clone()
        for slot, src in pairs:
            hit = indices == src  # [T, k], at most one True per row
            w_src = (weights * hit).sum(1, keepdim=True)
            weights = torch.where(hit, weights / 2, weights)
            has = hit.any(1, keepdim=True)
            # Tokens without the hot expert get a sentinel column (index num_experts, weight 0): no
            # expert. romer.moe.routing hands the model a real expert at weight 0 in its place.
            extra_i.append(torch.where(has, torch.full_like(has, slot, dtype=indices.dtype),
                                       torch.full_like(has, num_experts, dtype=indices.dtype)))
            extra_w.append(torch.where(has, w_src / 2, torch.zeros_like(w_src)))
        return torch.cat([weights] + extra_w, 1), torch.cat([indices] + extra_i, 1)

    return logit_mask, post
