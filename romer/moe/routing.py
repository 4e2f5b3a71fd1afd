"""Routing with a logit transform: forward hooks on every MoE router.

A hook (registered with prepend=True so it runs before anyone else's) takes the router's logits,
applies an optional per-layer logit transform, re-routes exactly as the family's router does
(Adapter.route), optionally rewrites the top-k result (replacement strategies), and can record the
raw logits and the final top-k indices for profiling.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch

from romer.moe.adapters import Adapter


class LayerRouting:
    """What to do in one MoE layer. Every field is optional."""

    def __init__(self, transform: Optional[Callable] = None, post: Optional[Callable] = None,
                 logits_fn: Optional[Callable] = None):
        self.transform = transform  # logits [T, E] -> logits [T, E]
        self.post = post  # (weights, indices, logits) -> (weights, indices)
        self.logits_fn = logits_fn  # router input [..., H] -> logits [T, E], in place of the router's own


class Recorder:
    """Collects per-layer raw router logits and/or final top-k indices during forward passes."""

    def __init__(self, logits: bool = False, indices: bool = True):
        self.want_logits, self.want_indices = logits, indices
        self.logits: dict[int, list] = {}
        self.indices: dict[int, list] = {}

    def add(self, layer, logits, indices):
        if self.want_logits:
            self.logits.setdefault(layer, []).append(logits.detach().float().cpu())
        if self.want_indices:
            self.indices.setdefault(layer, []).append(indices.detach().to(torch.int16).cpu())

    def cat_logits(self, layer):
        return torch.cat(self.logits[layer])

    def cat_indices(self, layer):
        return torch.cat(self.indices[layer]).long()

    def clear(self):
        self.logits.clear()
        self.indices.clear()


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (layer-wise calibration needs only the prefix)."""


@contextmanager
def routed(model, adapter: Adapter, plan: Optional[dict] = None, recorder: Optional[Recorder] = None,
           stop_after: Optional[int] = None):
    """Install routing hooks for the duration of the block.

    plan: {layer index: LayerRouting}; layers absent from the plan route unchanged (but are still
    recomputed by the adapter, which reproduces the module exactly).
    stop_after: raise StopForward after this layer's router has run (caller catches it).
    """
    plan = plan or {}
    handles = []
    for block in adapter.blocks(model):
        lr = plan.get(block.layer)

        def hook(module, args, output, layer=block.layer, lr=lr, n_experts=adapter.num_experts(block)):
            raw = adapter.router_logits(module, args, output)
            if lr is not None and lr.logits_fn is not None:  # a digital router replaces the module's logits
                raw = lr.logits_fn(args[0]).to(raw.dtype)
            logits = lr.transform(raw) if lr is not None and lr.transform is not None else raw
            weights, indices = adapter.route(module, logits)
            to_model = indices
            if lr is not None and lr.post is not None:
                weights, indices = lr.post(weights, indices, logits)
                # A post may add sentinel columns (index n_experts, weight 0) that mean "no expert".
                # The recorder keeps them; the model gets a real expert at weight 0 instead, because
                # transformers' grouped_mm leaves sentinel rows uninitialised (0 * NaN = NaN).
                to_model = indices.clamp(max=n_experts - 1)
            if recorder is not None:
                recorder.add(layer, raw, indices)
            if stop_after is not None and layer >= stop_after:
                raise StopForward
            return adapter.pack_output(module, output, logits, weights, to_model)

        handles.append(block.router.register_forward_hook(hook, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
