"""ROMER+ candidate: refit each router on the noisy chip's hidden states to the clean logits.

The router (0.03% of OLMoE-1B-7B's weights) is kept digital, and its matrix is refitted per chip,
layer by layer, by ridge regression: the layer's router inputs X [T, H] on calibration tokens, taken
in the noisy model with the earlier layers' routers already refitted, against the clean model's
logits L [T, E] on the same tokens,

    min ||X W^T + b - L||^2 + lam ||W - W_clean||^2,   lam = alpha * trace(X^T X) / H,

regularised towards the clean router (alpha -> inf: the clean matrix, kept digital, plus a mean
shift; `router_digital`, the clean matrix alone, is a baseline of its own). The refitted logits replace the router's, then the family's
own routing runs on them. It needs what the percentile map needs (clean logits on calibration data),
and attacks the part of routing damage a logit map cannot: noise in the hidden state that moves
tokens to other experts.
"""

from __future__ import annotations

import torch

from romer.moe.routing import LayerRouting, StopForward, routed


def ridge_router(x: torch.Tensor, target: torch.Tensor, w_clean: torch.Tensor, alpha: float):
    """(W [E, H], b [E]) of the ridge fit above, in float64 (the intercept is not regularised)."""
    x, target, w_clean = x.double(), target.double(), w_clean.double()
    mx, mt = x.mean(0), target.mean(0)
    xc, tc = x - mx, target - mt
    g = xc.T @ xc
    lam = alpha * g.diagonal().sum() / g.shape[0]
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    w = torch.linalg.solve(g + lam * eye, xc.T @ tc + lam * w_clean.T).T
    return w, mt - mx @ w.T


def digital_router(w: torch.Tensor, b: torch.Tensor | None = None):
    """x [..., H] -> logits [T, E] with a plain (digital) matrix: the periphery leaves it alone."""
    cache = {}

    def logits(x):
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (w.to(*key), None if b is None else b.to(*key))
        ww, bb = cache[key]
        out = x.reshape(-1, x.shape[-1]) @ ww.T
        return out if bb is None else out + bb

    return logits


def router_inputs(model, adapter, windows, batch_size, device, layer, plan) -> torch.Tensor:
    """Router inputs [T, H] of MoE layer `layer` on the windows, with routing `plan` active."""
    block = next(b for b in adapter.blocks(model) if b.layer == layer)
    got = []
    h = block.router.register_forward_pre_hook(
        lambda m, args: got.append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()))
    try:
        with torch.no_grad(), routed(model, adapter, plan, stop_after=layer):
            for i in range(0, windows.shape[0], batch_size):
                try:
                    model(windows[i:i + batch_size].to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        h.remove()
    return torch.cat(got)


def clean_routers(model, adapter) -> dict:
    """{layer: router matrix [E, H]}, copied; call in the clean state."""
    return {b.layer: b.router.weight.detach().float().cpu().clone() for b in adapter.blocks(model)}


def refit_routers(model, adapter, windows, batch_size, device, clean_logits: dict, clean_w: dict,
                  alpha: float) -> dict:
    """{layer: LayerRouting} with each router refitted (digital) in the current noisy state, layer by
    layer. clean_logits: {layer: [T, E]} of the clean model on the same windows; clean_w: clean_routers."""
    plan = {}
    for b in adapter.blocks(model):
        x = router_inputs(model, adapter, windows, batch_size, device, b.layer, plan)
        w, bias = ridge_router(x, clean_logits[b.layer], clean_w[b.layer], alpha)
        plan[b.layer] = LayerRouting(logits_fn=digital_router(w, bias))
    return plan


def clean_router_plan(clean_w: dict) -> dict:
    """{layer: LayerRouting} that route with the clean router matrices, kept digital (`router_digital`)."""
    return {layer: LayerRouting(logits_fn=digital_router(w)) for layer, w in clean_w.items()}
