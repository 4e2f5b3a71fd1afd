"""DVC stage fit_noise: resolve noise.source (a preset, or measurement CSVs fitted) into a noise model.

params: noise.source, noise.degree
outs:   noise/noise_model.json      full model JSON (tabulated curves + parametric form)
        metrics/noise_fit.json      summary (source, kind, g_max, coefficients, R², drift, read noise)
        metrics/plots/noise_fit.png measured std per level against the fit (curves only for presets)
"""

import sys
from pathlib import Path

# Repo root instead of stages/ on the path: stages/profile.py would shadow the stdlib `profile`.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from romer.errors import exit_on_user_error  # noqa: E402
from romer.io import atomic_path, write_json  # noqa: E402
from romer.noise_fit import plot_fit  # noqa: E402
from romer.noise_models import resolve_noise_model  # noqa: E402
from romer.params import load_params  # noqa: E402

MODEL_OUT = Path("noise/noise_model.json")
METRICS_OUT = Path("metrics/noise_fit.json")
PLOT_OUT = Path("metrics/plots/noise_fit.png")


@exit_on_user_error
def main():
    p = load_params()
    model = resolve_noise_model(p.noise.source, degree=p.noise.degree)
    full = model.to_json()
    full["source"] = p.noise.source
    summary = {"source": p.noise.source, **{k: v for k, v in model.summary().items() if k != "source"}}
    with atomic_path(PLOT_OUT) as tmp:
        plot_fit(full, tmp)
    write_json(METRICS_OUT, summary)
    write_json(MODEL_OUT, full)
    fit = summary.get("r2")
    print(f"noise model '{model.name}' ({model.kind}) from {p.noise.source}: g_max = {model.g_max:g} uS"
          + (f", R² = {fit:.4f}" if fit is not None else "")
          + f", drift: {'yes' if model.has_drift else 'no'}, read noise: {'yes' if model.has_read_noise else 'no'}")
    print(f"wrote {MODEL_OUT}, {METRICS_OUT}, {PLOT_OUT}")


if __name__ == "__main__":
    main()
