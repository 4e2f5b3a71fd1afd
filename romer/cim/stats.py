"""`romer noise-stats`: what the simulator does to one seeded matrix, for users and for parity checks.

It programs a seeded R x C N(0,1) matrix (R outputs, C inputs) with the project's mapping and
noise physics, at the published strength (all scales 1) unless told otherwise, and reports:
- gain: least squares of w' on w (1: no systematic shrinkage);
- rel_err_row_std: std of (w' - w) / w_max, w_max the clean abs-max of each row;
- alpha: mean drift-compensation factor over the arrays;
- out_rel_err (with a periphery): ||y' - y|| / ||y|| for N(0,1) inputs, y' through the noisy
  arrays and the periphery; `--noise none` gives the periphery alone.
docs/noise.md compares these with IBM aihwkit's own figures.
"""

from __future__ import annotations

import json
import math

import torch

from romer.cim.mapping import AnalogWeights
from romer.cim.noise_models import NoiseModel
from romer.cim.periphery import PRESETS as PERIPHERY_PRESETS, Periphery, out_rel_err
from romer.core.errors import UserError
from romer.core.records import AnalogTensor

N_INPUTS = 1024  # input vectors for out_rel_err


def no_noise() -> NoiseModel:
    """The mapping without device noise (`--noise none`)."""
    return NoiseModel(name="none", kind="preset", g_max=25.0, prog_coeffs=[0.0], clip_at_zero=False,
                      description="no device noise", preset=None)


def noise_stats(noise_model: NoiseModel, t_inference_s: float = 25.0, periphery: str | None = None,
                rows: int = 512, cols: int = 512, seed: int = 0, prog_scale: float = 1.0, read_scale: float = 1.0,
                drift_scale: float = 1.0, drift_compensation: bool = True, weight_scaling: str | None = None,
                tile=None, range_crest: float | None = None) -> dict:
    if rows < 1 or cols < 1:
        raise UserError(f"--rows and --cols must be >= 1, got {rows} x {cols}")
    if periphery is not None and periphery not in PERIPHERY_PRESETS:
        raise UserError(f"--periphery: unknown preset {periphery!r}; known: {list(PERIPHERY_PRESETS)}")
    pcfg = PERIPHERY_PRESETS[periphery] if periphery else None
    scaling = weight_scaling or (pcfg.weight_scaling if pcfg else "row")
    gen = torch.Generator().manual_seed(int(seed))
    w = torch.randn(rows, cols, generator=gen)
    x = torch.randn(N_INPUTS, cols, generator=gen)
    layer = torch.nn.Linear(cols, rows, bias=False).requires_grad_(False)
    layer.weight.copy_(w)
    rec = AnalogTensor(name="noise_stats", kind="attention", tensor=layer.weight, layer=0, part="w", expert=None)
    aw = AnalogWeights([rec], noise_model, tile=tile, weight_scaling=scaling, range_crest=range_crest)
    aw.apply(seed, prog_scale=prog_scale, read_scale=read_scale, drift_scale=drift_scale,
             t_inference_s=t_inference_s, drift_compensation=drift_compensation)
    wn = rec.tensor
    w_max = w.abs().amax(dim=1, keepdim=True)
    ref = AnalogWeights([AnalogTensor(name="noise_stats", kind="attention", tensor=w.clone(), layer=0, part="w",
                                      expert=None)], no_noise(), tile=tile, weight_scaling=scaling,
                      range_crest=range_crest)
    ref.apply(seed)  # the same mapping without noise: its scale is w_max, so scale / ref scale = alpha
    alpha = aw.scale(rec.name) / ref.scale(rec.name)
    out = {
        "noise": noise_model.name, "t_inference_s": t_inference_s, "rows": rows, "cols": cols, "seed": seed,
        "scales": {"prog": prog_scale, "read": read_scale, "drift": drift_scale},
        "drift_compensation": drift_compensation, "weight_scaling": scaling, "tile": list(tile) if tile else None,
        "range_crest": range_crest,
        "gain": float((wn.double() * w.double()).sum() / (w.double() ** 2).sum()),
        "rel_err_row_std": float(((wn - w) / w_max).double().std()),
        "alpha": float(alpha.double().mean()),
        "alpha_range": [float(alpha.min()), float(alpha.max())],
        "weight_rel_err": out_rel_err(x @ wn.t(), x @ w.t()),
    }
    if pcfg is not None:
        per = Periphery(aw, pcfg)
        per.reseed(seed)
        per.install(layer)
        per.enabled = True
        with torch.no_grad():
            y = layer(x)
        per.remove()
        out["periphery"] = pcfg.to_dict()
        out["out_rel_err"] = out_rel_err(y, x @ w.t())
        if pcfg.noise_management == "std":
            # against the digital output of the range-clipped input: aihwkit's perfect-IO reference keeps
            # the input-range clip of its pre-processing, so its figure leaves the clipping error out
            r = x.std(dim=-1, keepdim=True, correction=0) * pcfg.nm_std_alpha * pcfg.inp_bound
            out["out_rel_err_vs_clipped_input"] = out_rel_err(y, torch.maximum(torch.minimum(x, r), -r) @ w.t())
    return out


def level_table(noise_model: NoiseModel, t_inference_s: float, n: int = 6) -> list[dict]:
    """Per conductance level: programming sigma, drift nu, read sigma at t (all in uS)."""
    g = torch.linspace(0.0, noise_model.g_max, n, dtype=torch.float64)
    mean, std = noise_model.drift_nu(g)
    rows = []
    read = noise_model.read_sigma(g, t_inference_s)
    for i in range(n):
        rows.append({"g_uS": float(g[i]), "prog_sigma_uS": float(noise_model.prog_sigma(g[i:i + 1])[0]),
                     "nu_mean": float(mean[i]), "nu_std": float(std[i]), "read_sigma_uS": float(read[i])})
    return rows


def noise_stats_cli(args):
    from romer.cim.sources import resolve_noise_model

    try:
        nm = no_noise() if args.noise == "none" else resolve_noise_model(args.noise, degree=args.degree)
    except UserError as e:
        raise UserError(str(e).replace("params key 'noise.source'", "--noise")) from None
    for k in ("t_inference_s", "prog_scale", "read_scale", "drift_scale"):
        v = getattr(args, k)
        if not (math.isfinite(v) and v >= 0) or (k == "t_inference_s" and v <= 0):
            raise UserError(f"--{k.replace('_', '-')} must be a finite number {'> 0' if k == 't_inference_s' else '>= 0'}, got {v}")
    tile = None
    if args.tile:
        try:
            tile = tuple(int(v) for v in args.tile.lower().split("x"))
            assert len(tile) == 2 and min(tile) >= 1
        except (ValueError, AssertionError):
            raise UserError(f"--tile: expected ROWSxCOLS such as 512x512, got {args.tile!r}") from None
    if args.range_crest is not None and not (math.isfinite(args.range_crest) and args.range_crest > 0):
        raise UserError(f"--range-crest must be a finite number > 0, got {args.range_crest}")
    res = noise_stats(nm, args.t_inference_s, args.periphery, args.rows, args.cols, args.seed, args.prog_scale,
                      args.read_scale, args.drift_scale, not args.no_drift_compensation, args.weight_scaling, tile,
                      args.range_crest)
    if args.json:
        print(json.dumps(res))
        return
    print(f"noise {res['noise']} at t = {res['t_inference_s']:g} s, {args.rows} x {args.cols} N(0,1), seed {args.seed}, "
          f"{res['weight_scaling']} scaling, scales prog/read/drift = {args.prog_scale:g}/{args.read_scale:g}/"
          f"{args.drift_scale:g}")
    print(f"{'g (uS)':>8s} {'prog sigma':>11s} {'nu mean':>8s} {'nu std':>7s} {'read sigma':>11s}")
    for r in level_table(nm, args.t_inference_s):
        print(f"{r['g_uS']:8.2f} {r['prog_sigma_uS']:11.4f} {r['nu_mean']:8.4f} {r['nu_std']:7.4f} {r['read_sigma_uS']:11.4f}")
    print(f"gain {res['gain']:.4f}   rel_err_row_std {res['rel_err_row_std']:.4f}   alpha {res['alpha']:.4f}   "
          f"weight-only output error {100 * res['weight_rel_err']:.2f}%")
    if "out_rel_err" in res:
        print(f"with periphery {args.periphery}: output error {100 * res['out_rel_err']:.2f}%")
