"""Stage fit_noise: resolve noise.source (a preset, or measurement CSVs fitted) into a noise model.

params: noise.source, noise.degree
outs:   noise/noise_model.json      full model JSON (tabulated curves + parametric form)
        metrics/noise_fit.json      summary (source, kind, g_max, coefficients, R², drift, read noise)
        metrics/plots/noise_fit.png measured std per level against the fit (curves only for presets)
"""

from __future__ import annotations

from pathlib import Path

from romer.cim.noise_fit import plot_fit
from romer.cim.sources import resolve_noise_model
from romer.core.io import atomic_path, write_json
from romer.core.paths import NOISE_MODEL
from romer.core.staleness import made_with

# what noise/noise_model.json is made from (the stage's params in dvc.yaml); the stages that load it check them
NOISE_MODEL_PARAMS = ("noise.source", "noise.degree")

METRICS_OUT = Path("metrics/noise_fit.json")
PLOT_OUT = Path("metrics/plots/noise_fit.png")


def run_fit_noise(p, model_out=NOISE_MODEL):
    model = resolve_noise_model(p.noise.source, degree=p.noise.degree)
    full = model.to_json()
    full["source"] = p.noise.source
    full["made_with"] = made_with(p, NOISE_MODEL_PARAMS)
    summary = {"source": p.noise.source, **{k: v for k, v in model.summary().items() if k != "source"}}
    with atomic_path(PLOT_OUT) as tmp:
        plot_fit(full, tmp)
    write_json(METRICS_OUT, summary)
    write_json(model_out, full)
    fit = summary.get("r2")
    print(f"noise model '{model.name}' ({model.kind}) from {p.noise.source}: g_max = {model.g_max:g} uS"
          + (f", R² = {fit:.4f}" if fit is not None else "")
          + f", drift: {'yes' if model.has_drift else 'no'}, read noise: {'yes' if model.has_read_noise else 'no'}")
    print(f"wrote {model_out}, {METRICS_OUT}, {PLOT_OUT}")
