"""The PNGs and CSVs of the stages: one colour per method everywhere, readable sizes, the right CSV columns."""

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from romer.reporting.plots import METHOD_COLORS, method_color, plot_eval, plot_profile

CHIP = Path(__file__).resolve().parents[1] / "data" / "chip"


def fake_eval(methods=("noisy", "calibrate_only", "replace_only", "romer", "hetero_digital"), layers=4):
    rng = np.random.default_rng(0)
    ppl = {"clean": 50.0}
    for i, m in enumerate(methods):
        mean = 70.0 - 2 * i
        ppl[m] = {"mean": mean, "std": 1.0, "ci95": [mean - 1, mean + 1], "per_seed": [mean] * 3}
    cv = {m: {str(l): float(rng.uniform(0.1, 0.5)) for l in range(layers)} for m in ("clean",) + tuple(methods)}
    return {"dataset": "builtin-test", "seeds": [0, 1, 2], "ppl": ppl, "cv_per_layer": cv}


def fake_profile(E=16, layers=3):
    rng = np.random.default_rng(1)
    load = lambda: (rng.dirichlet(np.ones(E))).tolist()  # noqa: E731
    return {"num_experts": E, "top_k": 2, "tau": 0.25,
            "clean": {"layers": {str(l): {"load": load()} for l in range(layers)}},
            "noisy_load": {str(l): load() for l in range(layers)}}


def test_every_known_method_has_its_own_colour():
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)
    assert method_color("something_new") == method_color("something_new")  # stable, not hash-randomised


def test_eval_and_profile_plots(tmp_path):
    made = plot_eval(fake_eval(), tmp_path)  # what evaluate logs to MLflow as its own artifacts
    assert sorted(p.name for p in made) == ["eval_cv_per_layer.csv", "eval_cv_per_layer.png", "eval_ppl.csv",
                                            "eval_ppl.png"]
    plot_profile(fake_profile(), tmp_path)
    for name, max_w in (("eval_ppl", 1200), ("eval_cv_per_layer", 1200), ("profile_load", 1400),
                        ("profile_heatmap", 1300)):
        w, h = Image.open(tmp_path / f"{name}.png").size
        assert 300 < w <= max_w and 200 < h <= 1400, (name, w, h)
    with open(tmp_path / "profile_load.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["slot"]) for r in rows] == list(range(16 * 3))  # an x that does not repeat across layers
    with open(tmp_path / "eval_cv_per_layer.csv") as f:
        header = next(csv.reader(f))
    assert header == ["layer", "clean", "noisy", "calibrate_only", "replace_only", "romer", "hetero_digital"]


def test_noise_fit_plot_has_a_normal_width(tmp_path):
    from romer.cim.chip_data import load_measurements
    from romer.cim.noise_fit import fit_noise, plot_fit

    plot_fit(fit_noise(load_measurements(CHIP / "pcm_sample.csv"), degree=2), tmp_path / "fit.png")
    w, h = Image.open(tmp_path / "fit.png").size
    assert w <= 1200 and h <= 420, (w, h)
