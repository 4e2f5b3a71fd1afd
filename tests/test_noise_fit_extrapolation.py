"""Noise fit below the lowest measured level (romer.cim.noise_fit): never held flat.

Read noise follows a power law a g^b to 0 at g = 0 (the PCM law's shape), drift nu is linear in
ln g and bounded, and a measured RESET level (g_target = 0) is used when the data has one.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from romer.cim.chip_data import load_measurements
from romer.cim.noise_fit import DRIFT_EXTRAP_CAP, _drift_rows, _read_row, fit_noise
from romer.cim.noise_models import NoiseModel

sys.path.insert(0, str(Path(__file__).parent))
from test_noise_fit import CHIP, ROOT, gen, t64  # noqa: E402,F401  (the sample generator and helpers)

pytestmark = pytest.mark.usefixtures("one_thread")


def read_factor(t):
    return math.sqrt(math.log((t + gen.PCM_T_READ) / (2 * gen.PCM_T_READ)))


def pcm_read_point(g, t):
    """The PCM law at one device of conductance g read at t (no drift): |g| Q_s(g) sqrt(ln(...))."""
    return abs(g) * float(gen.pcm_q(np.asarray(g))) * read_factor(t)


def pcm_read_level(g, t, n=80):
    """Like with like: the read sigma the sample's fit measures for a level programmed at target g.

    The generator draws each device's read sigma from its own programmed conductance g_p ~ N(g,
    sigma_prog(g)) (clipped at 0) drifted by its own nu, |g_p (t/t0)^-nu| Q_s(g_p) sqrt(ln(...));
    the fit pools the within-device variance over the level's devices: the rms over (g_p, nu).
    """
    x, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    gp = np.maximum(g + gen.pcm_sigma(g) * x, 0.0)[:, None]
    mu, sd = gen.pcm_nu(np.asarray(g))
    nu = (mu + sd * x)[None, :]
    gd = gp * (t / gen.PCM_T0) ** (-nu) if t > gen.PCM_T0 else gp + 0 * nu
    return math.sqrt(float(np.sum(w[:, None] * w[None, :] * (gd * gen.pcm_q(gp)) ** 2))) * read_factor(t)


@pytest.fixture(scope="module")
def pcm_fit():
    return fit_noise(load_measurements(CHIP / "pcm_sample.csv"), degree=2)


def at(fit_table, grid, g):
    i = int(np.argmin(np.abs(np.asarray(grid) - g)))
    assert abs(grid[i] - g) < 1e-9, (g, grid[i])  # 0, 0.5, 1.25 and 2.5 uS are grid points
    return fit_table[i]


def test_pcm_read_noise_follows_the_law_below_range(pcm_fit):
    fit, rn = pcm_fit, pcm_fit["read_noise"]
    ex = fit["fit"]["extrapolation_below_range"]
    assert ex["lowest_level_uS"] == 2.5 and ex["programming_sigma"].startswith("polynomial")
    assert ex["read_noise"].startswith("power_law a*g^b")
    nm = NoiseModel.from_json(json.loads(json.dumps(fit, allow_nan=False)))
    assert rn["t_s"] == [20.0, 300.0, 3600.0, 86400.0]
    for t, row, how in zip(rn["t_s"], rn["sigma_uS"], ex["read_noise_per_time"]):
        assert how["t_s"] == t and how["method"] == "power_law" and how["fallback"] is None
        assert 0.2 < how["b"] < 0.6, how  # the law: sigma ~ g^0.35 for one device below Q_s's cap
        assert len(row) == len(rn["g_uS"])
        s0, s05, s125, s25 = (at(row, rn["g_uS"], g) for g in (0.0, 0.5, 1.25, 2.5))
        assert s0 < 1e-6 and 0 < s05 < s125 < s25  # to 0 at g = 0, not flat
        assert float(nm.read_sigma(t64(0.0), t)) < 1e-6
        for g, s in ((0.5, s05), (1.25, s125), (2.5, s25)):
            assert abs(s / pcm_read_level(g, t) - 1) < 0.20, (t, g, s, pcm_read_level(g, t))
    # at 20 s (no drift yet) the one-device law itself
    row = rn["sigma_uS"][0]
    for g in (1.25, 2.5):
        assert abs(at(row, rn["g_uS"], g) / pcm_read_point(g, 20.0) - 1) < 0.20


def test_pcm_drift_below_range_rises_toward_low_g_and_is_bounded(pcm_fit):
    d = pcm_fit["drift_nu"]
    ex = pcm_fit["fit"]["extrapolation_below_range"]
    assert ex["drift_nu"].startswith("linear in ln g") and "1.5 x the largest" in ex["drift_nu"]
    lv = [p for p in pcm_fit["levels"] if p["nu_mean"] is not None]
    g = np.asarray(d["g_uS"])
    mean, std = np.asarray(d["mean"]), np.asarray(d["std"])
    below = g < 2.5
    m0, m05, m125, m25 = (at(mean, g, x) for x in (0.0, 0.5, 1.25, 2.5))
    assert m0 >= m05 > m125 > m25  # not flat: nu grows toward low g, as the law does
    assert np.all(np.diff(mean[below | (g == 2.5)]) <= 0)
    cap_mean = DRIFT_EXTRAP_CAP * max(p["nu_mean"] for p in lv)
    cap_std = DRIFT_EXTRAP_CAP * max(p["nu_std"] for p in lv)
    assert np.all((mean[below] >= 0) & (mean[below] <= cap_mean + 1e-8))
    assert np.all((std[below] >= 0) & (std[below] <= cap_std + 1e-8))
    assert ex["drift_nu_detail"]["mean_bounds"] == [0.0, pytest.approx(cap_mean)]
    assert abs(m0 - cap_mean) < 1e-8  # the law's ln g growth reaches the cap before g = 0
    for x in (0.5, 1.25, 2.5):
        mu, _ = gen.pcm_nu(np.asarray(x))
        assert abs(at(mean, g, x) / float(mu) - 1) < 0.10, x
    assert at(std, g, 1.25) > at(std, g, 2.5)


# --- a synthetic chip with a measured RESET state (g_target = 0)
RESET_G, RESET_READ, RESET_NU = 0.3, 0.03, 0.10


def make_reset_csv(path, seed=5, per=200, times=(1.0, 100.0), reads=(3, 2)):
    """Levels 0 (RESET, ~0.3 uS), 5, 10, 15, 20 uS; read sigma 0.02 sqrt(g) (RESET: 0.03); nu 0.05
    (RESET: 0.10). At the second time the RESET devices are read only once (no read estimate)."""
    rng = np.random.default_rng(seed)
    g_t = np.repeat([0.0, 5.0, 10.0, 15.0, 20.0], per)
    n = len(g_t)
    reset = g_t == 0
    g_p = np.where(reset, RESET_G + 0.05 * rng.standard_normal(n), g_t + (0.3 + 0.02 * g_t) * rng.standard_normal(n))
    g_p = np.abs(g_p)
    nu = np.where(reset, RESET_NU, 0.05) + 0.005 * rng.standard_normal(n)
    s_read = np.where(reset, RESET_READ, 0.02 * np.sqrt(g_t))
    lines = ["g_target_uS,g_measured_uS,t_s,device_id,read_id"]
    for k, (t, nr) in enumerate(zip(times, reads)):
        g_d = g_p * (t / times[0]) ** (-nu)
        for r in range(nr):
            keep = np.ones(n, dtype=bool) if (k == 0 or r == 0) else ~reset
            g_m = np.maximum(g_d + s_read * rng.standard_normal(n), 0.0)
            lines += [f"{a:g},{b:.5f},{t:g},{d},{r}" for a, b, d in zip(g_t[keep], g_m[keep], np.flatnonzero(keep))]
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


def test_measured_reset_level_is_used(tmp_path):
    fit = fit_noise(load_measurements(make_reset_csv(tmp_path / "reset.csv")), degree=1)
    json.dumps(fit, allow_nan=False)
    ex = fit["fit"]["extrapolation_below_range"]
    assert ex["lowest_level_uS"] == 0.0
    rn = fit["read_noise"]
    assert rn["t_s"] == [1.0, 100.0]
    by_time = {h["t_s"]: h for h in ex["read_noise_per_time"]}
    # t = 1 s: the RESET level was read repeatedly; the table starts at its measured value
    reset_lv = [p for p in rn["levels"] if p["g_uS"] == 0.0]
    assert [p["t_s"] for p in reset_lv] == [1.0]
    assert by_time[1.0]["method"] == "measured_reset"
    assert rn["sigma_uS"][0][0] == pytest.approx(reset_lv[0]["sigma_uS"], abs=1e-8)
    assert rn["sigma_uS"][0][0] == pytest.approx(by_time[1.0]["reset_sigma_uS"], abs=1e-8)
    assert abs(rn["sigma_uS"][0][0] / RESET_READ - 1) < 0.15
    # t = 100 s: no repeated RESET reads, so the power law from the levels above takes over
    assert by_time[100.0]["method"] == "power_law" and rn["sigma_uS"][1][0] < 1e-6
    assert ex["read_noise"].startswith("per read time: t = 1 s: measured RESET level (g_target = 0); "
                                       "t = 100 s: power_law a*g^b")
    assert 0.3 < by_time[100.0]["b"] < 0.7  # the generating sqrt(g)
    # drift: the RESET level's measured nu at g = 0
    d = fit["drift_nu"]
    reset_nu = next(p for p in fit["levels"] if p["g_uS"] == 0.0)
    assert ex["drift_nu"].startswith("measured RESET level")
    assert d["mean"][0] == pytest.approx(reset_nu["nu_mean"], abs=1e-8)
    assert d["std"][0] == pytest.approx(reset_nu["nu_std"], abs=1e-8)
    assert abs(d["mean"][0] - RESET_NU) < 0.01
    nm = NoiseModel.from_json(fit)
    mean, _ = nm.drift_nu(t64([0.0, 2.5, 5.0]))
    assert float(mean[0]) > float(mean[1]) > float(mean[2])  # linear from RESET to the 5 uS level


def test_read_power_law_falls_back_to_proportional():
    grid = np.linspace(0.0, 20.0, 101)
    # read sigma falling with g at the low levels: a fitted b <= 0 would not go to 0 at g = 0
    row, how = _read_row(grid, [5.0, 10.0, 15.0, 20.0], np.array([0.3, 0.2, 0.15, 0.15]) ** 2)
    assert how["b_fitted"] <= 0 and how["b"] == 1.0 and "b = 1" in how["fallback"]
    below = grid < 5.0
    assert np.allclose(row[below], 0.3 * grid[below] / 5.0) and row[0] == 0.0
    assert np.allclose(row[~below], np.sqrt(np.interp(grid[~below], [5, 10, 15, 20], np.array([0.3, 0.2, 0.15, 0.15]) ** 2)))
    # one level only: proportional to g too
    row, how = _read_row(grid, [8.0], [0.04])
    assert how["b"] == 1.0 and how["fallback"] and np.isclose(row[20], 0.2 * grid[20] / 8.0)
    # a clean power law is recovered exactly, through the lowest level
    g = np.array([4.0, 8.0, 12.0, 16.0])
    row, how = _read_row(grid, g, (0.1 * g**0.4) ** 2)
    assert how["b"] == pytest.approx(0.4) and how["a"] == pytest.approx(0.1)
    assert np.allclose(row[grid < 4], 0.1 * grid[grid < 4] ** 0.4)


def test_drift_extrapolation_bounds_and_single_level():
    grid = np.linspace(0.0, 20.0, 101)
    g = [4.0, 8.0, 12.0]
    mean, std, how = _drift_rows(grid, g, [0.08, 0.06, 0.05], [0.01, 0.02, 0.03], 20.0)
    below = grid < 4.0
    assert how["method"] == "ln_g_linear" and how["levels_uS"] == [4.0, 8.0]
    slope = (0.06 - 0.08) / math.log(2)
    lg = np.log(np.maximum(grid, 0.02))
    assert np.allclose(mean[below], np.clip(0.08 + slope * (lg[below] - math.log(4)), 0, 1.5 * 0.08))
    assert mean[0] == pytest.approx(1.5 * 0.08)  # capped
    assert np.all(std[below] >= 0) and std[0] == 0.0  # std falling toward low g: clipped at 0, not negative
    assert np.all(np.diff(mean[: int(np.flatnonzero(~below)[0]) + 1]) <= 0)
    mean, std, how = _drift_rows(grid, [6.0], [0.05], [0.01], 20.0)
    assert how["method"] == "constant" and np.allclose(mean, 0.05)
