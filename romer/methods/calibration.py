"""ROMER step 2: percentile recalibration of router logits.

Per layer and per expert, record the (p_lo, p_hi) percentiles of the router logits on calibration
tokens, for the clean model and for the noisy (replaced) model. At inference each noisy logit is
mapped affinely, l' = a * l + b, so that its noisy percentiles land on the clean ones; then the
family's own routing runs on l'.

Choices of this project (the paper's abstract does not fix them), each a parameter:
- the percentiles (calibrate.percentiles);
- `layerwise`: calibrate layer by layer, taking each layer's noisy statistics after the earlier
  layers are already calibrated (so the statistics match what the layer will see at inference);
- the source of the noisy statistics (calibrate.mode): `per_chip`, from the very noise instance
  that is evaluated (a deployed chip can run calibration data), or `expected`, averaged over other
  noise instances (calib.seeds), for a chip that cannot be calibrated individually.
"""

from __future__ import annotations

import torch

from romer.moe.routing import LayerRouting, Recorder, StopForward, routed


def percentiles(logits: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """[T, E] logits -> [E, 2] (p_lo, p_hi) per expert (linear interpolation)."""
    q = torch.tensor([lo / 100, hi / 100], dtype=torch.float64)
    return torch.quantile(logits.double(), q, dim=0).T.contiguous()


def affine_map(noisy: torch.Tensor, clean: torch.Tensor):
    """(a, b) with a * noisy_p + b == clean_p at both percentiles, per expert. A degenerate noisy
    spread (an expert whose logits are constant) gets a shift only."""
    n_span = noisy[:, 1] - noisy[:, 0]
    c_span = clean[:, 1] - clean[:, 0]
    ok = n_span.abs() > 1e-12
    a = torch.where(ok, c_span / torch.where(ok, n_span, torch.ones_like(n_span)), torch.ones_like(n_span))
    b = clean[:, 0] - a * noisy[:, 0]
    return a, b


def temperature_map(noisy: torch.Tensor, clean: torch.Tensor):
    """One scale per layer, no shift: the pooled percentile span ratio (clean / noisy) over all
    experts. The trivial baseline a router temperature gives, fitted on the same statistics."""
    n_span = (noisy[:, 1] - noisy[:, 0]).sum()
    c_span = (clean[:, 1] - clean[:, 0]).sum()
    scale = c_span / n_span if n_span.abs() > 1e-12 else torch.ones_like(n_span)
    a = scale.expand(noisy.shape[0]).clone()
    return a, torch.zeros_like(a)


def shift_map(noisy: torch.Tensor, clean: torch.Tensor):
    """Per-expert shift, no scale: the percentile midpoints moved onto the clean ones (selection
    only, the spread left as it is)."""
    a = torch.ones(noisy.shape[0], dtype=noisy.dtype)
    return a, clean.mean(dim=1) - noisy.mean(dim=1)


# How the (a, b) of a layer are fitted from its noisy and clean percentiles: ROMER's per-expert map,
# and the two trivial baselines it must beat (a temperature, a shift).
FITS = {"percentile": affine_map, "temperature": temperature_map, "shift": shift_map}


def make_transform(a: torch.Tensor, b: torch.Tensor):
    cache = {}

    def transform(logits):
        key = (logits.device, logits.dtype)
        if key not in cache:
            cache[key] = (a.to(*key), b.to(*key))
        aa, bb = cache[key]
        return logits * aa + bb

    return transform


def collect_logits(model, adapter, windows, batch_size, device, plan=None, stop_after=None) -> dict:
    """Raw router logits {layer: [T, E]} on the windows, with routing `plan` active."""
    rec = Recorder(logits=True, indices=False)
    with torch.no_grad(), routed(model, adapter, plan, rec, stop_after=stop_after):
        for i in range(0, windows.shape[0], batch_size):
            try:
                model(windows[i:i + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    return {layer: rec.cat_logits(layer) for layer in rec.logits}


def compose(transform=None, mask=None, post=None) -> LayerRouting:
    """One layer's routing: calibrate, then exclude replica slots, then redistribute top-k."""
    if transform is not None and mask is not None:
        t = lambda x: mask(transform(x))  # noqa: E731
    else:
        t = transform or mask
    return LayerRouting(transform=t, post=post)


def calibrate_maps(model, adapter, windows, batch_size, device, clean_pct: dict, pcts, layerwise=True,
                   replacement_fns=None, instances=(None,), fit="percentile") -> dict:
    """Affine maps {layer: (a, b)} that send noisy percentiles onto `clean_pct` {layer: [E, 2]}.

    `instances` are callables that put the model into each noisy state whose statistics are pooled
    (per_chip: the single current state, given as None; expected: one callable per calib seed).
    The percentiles are averaged over instances. `replacement_fns`: {layer: (mask, post)}. `fit`: a
    key of FITS.
    """
    if fit not in FITS:
        raise ValueError(f"unknown calibration fit {fit!r}; expected one of {sorted(FITS)}")
    fit_fn = FITS[fit]
    replacement_fns = replacement_fns or {}
    layers = sorted(clean_pct)
    maps = {}

    def plan_with(maps_now):
        plan = {}
        for layer in layers:
            mask, post = replacement_fns.get(layer, (None, None))
            tr = make_transform(*maps_now[layer]) if layer in maps_now else None
            if tr or mask or post:
                plan[layer] = compose(tr, mask, post)
        return plan

    groups = [[layer] for layer in layers] if layerwise else [layers]
    for group in groups:
        acc = None
        for put_state in instances:
            if put_state is not None:
                put_state()
            got = collect_logits(model, adapter, windows, batch_size, device, plan_with(maps),
                                 stop_after=group[-1])
            p = {layer: percentiles(got[layer], *pcts) for layer in group}
            acc = p if acc is None else {k: acc[k] + p[k] for k in group}
        for layer in group:
            maps[layer] = fit_fn(acc[layer] / len(instances), clean_pct[layer])
    return maps
