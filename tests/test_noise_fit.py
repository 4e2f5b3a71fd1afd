"""Noise-model fitting (romer.cim.noise_fit) and presets (romer.cim.noise_models).

Round trips: the shipped samples are drawn from published fits (scripts/make_chip_samples.py);
fitting them must give back the generating curves. A law the code has never seen is generated here.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from romer.cim.chip_data import load_measurements
from romer.cim.noise_fit import fit_noise, plot_fit
from romer.cim.noise_models import PRESETS, NoiseModel, gaussian
from romer.cim.sources import load_noise_model, resolve_noise_model
from romer.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CHIP = ROOT / "data" / "chip"
sys.path.insert(0, str(ROOT / "scripts"))
import make_chip_samples as gen  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def t64(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def rel_err(a, b):
    return np.abs(np.asarray(a) / np.asarray(b) - 1)


@pytest.fixture(scope="module")
def pcm_fit():
    return fit_noise(load_measurements(CHIP / "pcm_sample.csv"), degree=2)


def test_pcm_sample_round_trip(pcm_fit):
    fit = pcm_fit
    json.dumps(fit, allow_nan=False)
    for key in ("g_max_uS", "programming_sigma_uS", "drift_nu", "read_noise"):
        assert key in fit
    assert fit["g_max_uS"] == 25.0
    assert set(fit["programming_sigma_uS"]) == {"g_uS", "sigma_uS"}
    assert set(fit["drift_nu"]) >= {"g_uS", "mean", "std"}
    assert fit["fit"]["r2"] > 0.95 and not fit["fit"]["includes_read_noise"]
    nm = NoiseModel.from_json(fit)
    g = np.linspace(2.5, 25.0, 5)
    assert rel_err(nm.prog_sigma(t64(g)), gen.pcm_sigma(g)).max() < 0.05
    mean, std = nm.drift_nu(t64(g))
    mu_true, sd_true = gen.pcm_nu(g)
    assert rel_err(mean, mu_true).max() < 0.10
    assert rel_err(std, sd_true).max() < 0.25
    assert nm.t0 == 20.0
    # read noise at the earliest time: |g| Q_s(g) sqrt(ln(t / 2 t_read))
    true_read = g * gen.pcm_q(g) * math.sqrt(math.log((20 + 250e-9) / 500e-9))
    assert rel_err(nm.read_sigma(t64(g), 20.0), true_read).max() < 0.10


def test_reram_samples_round_trip():
    wan = NoiseModel.from_json(fit_noise(load_measurements(CHIP / "reram_wan2022_sample.csv"), degree=3))
    g = np.linspace(0.2, 1.0, 5) * gen.WAN_G_MAX
    assert rel_err(wan.prog_sigma(t64(g)), gen.wan_sigma(g)).max() < 0.05
    assert not wan.has_drift and not wan.has_read_noise  # one time, one read per device
    fit = fit_noise(load_measurements(CHIP / "reram_milo2021_sample.csv"), degree=2)
    assert fit["fit"]["binned"] and fit["fit"]["includes_read_noise"]
    milo = NoiseModel.from_json(fit)
    g = np.linspace(0.15, 0.95, 5) * gen.MILO_G_MAX
    assert rel_err(milo.prog_sigma(t64(g)), gen.milo_sigma(g)).max() < 0.05


# --- a noise law the code was not written for: sqrt-shaped sigma, nu rising with g,
# constant read noise, t0 = 1 s.
def unseen_sigma(g):
    return 0.3 + 0.25 * np.sqrt(g)


def unseen_nu(g):
    return 0.02 + 0.0005 * g, np.full_like(g, 0.004)


UNSEEN_READ = 0.15


def make_unseen(path, with_device=True, seed=7, per=2000, times=(1.0, 100.0, 10000.0), reads=2):
    rng = np.random.default_rng(seed)
    g_t = np.repeat(np.linspace(7.5, 60.0, 8), per)
    n = len(g_t)
    g_p = g_t + unseen_sigma(g_t) * rng.standard_normal(n)
    mu, sd = unseen_nu(g_t)
    nu = mu + sd * rng.standard_normal(n)
    lines = ["g_target_uS,g_measured_uS,t_s" + (",device_id,read_id" if with_device else "")]
    for t in times:
        g_d = g_p * (t / times[0]) ** (-nu)
        for r in range(reads):
            g_m = np.maximum(g_d + UNSEEN_READ * rng.standard_normal(n), 0)
            cols = [g_t.astype(str), np.char.mod("%.4f", g_m), np.full(n, f"{t:g}")]
            if with_device:
                cols += [np.arange(n).astype(str), np.full(n, str(r))]
            lines.extend(map(",".join, zip(*cols)))
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


def test_unseen_law_round_trip(tmp_path):
    fit = fit_noise(load_measurements(make_unseen(tmp_path / "u.csv")), degree=2)
    nm = NoiseModel.from_json(fit)
    g = np.linspace(7.5, 60.0, 5)
    assert rel_err(nm.prog_sigma(t64(g)), unseen_sigma(g)).max() < 0.05
    mean, std = nm.drift_nu(t64(g))
    assert rel_err(mean, unseen_nu(g)[0]).max() < 0.10
    assert rel_err(std, 0.004).max() < 0.3
    assert nm.t0 == 1.0
    for t in (1.0, 100.0, 1e4):
        assert rel_err(nm.read_sigma(t64(g), t), UNSEEN_READ).max() < 0.10


def test_population_drift_without_device_id(tmp_path):
    m = load_measurements(make_unseen(tmp_path / "p.csv", with_device=False, per=500, reads=1))
    fit = fit_noise(m, degree=1)
    assert fit["drift_fit"]["method"] == "population" and fit["read_noise"] is None
    mean, _ = NoiseModel.from_json(fit).drift_nu(t64([10.0, 30.0, 55.0]))
    assert rel_err(mean, unseen_nu(np.array([10.0, 30.0, 55.0]))[0]).max() < 0.10


def test_levels_clipped_at_zero_are_fitted_as_censored(tmp_path):
    # devices read back as 0 (clipped) at the low levels: a censored-normal fit recovers sigma there
    rng = np.random.default_rng(3)
    g_t = np.repeat([0.0, 1.0, 5.0, 10.0, 20.0, 30.0], 1500)
    sig = 0.8 + 0.03 * g_t
    g_m = np.maximum(g_t + sig * rng.standard_normal(len(g_t)), 0)
    p = tmp_path / "clip.csv"
    p.write_text("g_target_uS,g_measured_uS\n" + "".join(f"{a:g},{b:.4f}\n" for a, b in zip(g_t, g_m)))
    fit = fit_noise(load_measurements(p), degree=1)
    assert fit["levels"][0]["censored_frac"] > 0.4 and fit["fit"]["censored_levels"] == 2
    assert abs(fit["levels"][0]["offset_uS"]) < 0.05
    nm = NoiseModel.from_json(fit)
    g = np.array([0.0, 1.0, 10.0, 30.0])
    assert rel_err(nm.prog_sigma(t64(g)), 0.8 + 0.03 * g).max() < 0.05


def test_no_time_no_repeats(tmp_path):
    rng = np.random.default_rng(1)
    p = tmp_path / "s.csv"
    p.write_text("g_target_uS,g_measured_uS\n" + "".join(
        f"{g},{g + 0.2 * rng.standard_normal():.4f}\n" for g in (2, 4, 6, 8) for _ in range(40)))
    fit = fit_noise(load_measurements(p), degree=1)
    assert fit["drift_nu"] is None and fit["read_noise"] is None and fit["fit"]["includes_read_noise"]
    nm = NoiseModel.from_json(fit)
    assert not nm.has_drift and not nm.has_read_noise
    assert abs(float(nm.prog_sigma(t64(5.0))) - 0.2) < 0.05
    with pytest.raises(UserError, match="4 programmed level.*degree-4 polynomial .5 coefficients. needs at least 10 .2 levels per coefficient.; lower --degree .noise.degree. to at most 1"):
        fit_noise(load_measurements(p), degree=4)
    with pytest.raises(UserError, match="integer >= 0"):
        fit_noise(load_measurements(p), degree=-1)


def test_json_round_trip_and_plot(pcm_fit, tmp_path):
    nm = NoiseModel.from_json(json.loads(json.dumps(pcm_fit)))
    again = NoiseModel.from_json(nm.to_json())
    g = t64(np.linspace(0, 25, 11))
    assert torch.equal(nm.prog_sigma(g), again.prog_sigma(g))
    assert torch.equal(nm.read_sigma(g, 25.0), again.read_sigma(g, 25.0))
    png = tmp_path / "fit.png"
    plot_fit(pcm_fit, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_fit(PRESETS["reram-milo2021"].build().to_json(), tmp_path / "preset.png")
    # a minimal hand-written JSON with only the tabulated curves loads too
    minimal = {"g_max_uS": 10.0, "programming_sigma_uS": {"g_uS": [0, 10], "sigma_uS": [1.0, 2.0]},
               "drift_nu": None, "read_noise": None}
    assert abs(float(NoiseModel.from_json(minimal).prog_sigma(t64(5.0))) - 1.5) < 1e-9
    with pytest.raises(UserError, match="missing key 'g_max_uS'"):
        NoiseModel.from_json({"programming_sigma_uS": {}})


def test_presets_match_published_fits():
    pcm = PRESETS["pcm-joshi2020"].build()
    assert pcm.g_max == 25.0 and pcm.t0 == 20.0 and pcm.has_drift and pcm.has_read_noise
    g = t64([2.5, 12.5, 25.0])
    x = g / 25
    assert torch.allclose(pcm.prog_sigma(g), 0.26348 + 1.9650 * x - 1.1731 * x**2)
    mean, std = pcm.drift_nu(g)
    assert torch.allclose(mean, (-0.0155 * x.log() + 0.0244).clamp(0.049, 0.1))
    assert torch.allclose(std, (-0.0125 * x.log() - 0.0059).clamp(0.008, 0.045))
    q = (0.0088 / x**0.65).clamp(max=0.2)
    assert torch.allclose(pcm.read_sigma(g, 20.0), g * q * math.sqrt(math.log((20 + 250e-9) / 500e-9)))
    wan = PRESETS["reram-wan2022"].build()
    G = t64([5.0, 20.0, 39.26])
    assert torch.allclose(wan.prog_sigma(G), 1.536e-4 * G**3 - 1.167e-2 * G**2 + 0.2374 * G + 1.053)
    assert wan.g_max == 39.26 and not wan.has_drift
    milo = PRESETS["reram-milo2021"].build()
    G = t64([10.0, 225.0])
    assert torch.allclose(milo.prog_sigma(G), -0.009107 * G + 4.782321) and milo.g_max == 225
    gs = gaussian(0.1)
    assert not gs.clip_at_zero and torch.allclose(gs.prog_sigma(G), torch.full_like(G, 0.1 * gs.g_max / math.sqrt(2)))
    for name, p in PRESETS.items():
        m = p.build()
        back = NoiseModel.from_json(json.loads(json.dumps(m.to_json(), allow_nan=False)))
        assert torch.equal(back.prog_sigma(G), m.prog_sigma(G)), name


def test_resolve_noise_model(tmp_path):
    assert resolve_noise_model("pcm-joshi2020").name == "pcm-joshi2020"
    assert resolve_noise_model("gaussian").preset["fraction"] == 0.05
    assert resolve_noise_model("gaussian:0.2").preset["fraction"] == 0.2
    with pytest.raises(UserError, match="params key 'noise.source': bad gaussian fraction"):
        resolve_noise_model("gaussian:abc")
    with pytest.raises(UserError, match="params key 'noise.source': .*missing.csv: file not found"):
        resolve_noise_model(str(tmp_path / "missing.csv"))
    with pytest.raises(UserError, match="params key 'noise.source': .*no file matches"):
        resolve_noise_model(str(tmp_path / "*.csv"))
    with pytest.raises(UserError, match="params key 'noise.source': file not found"):
        resolve_noise_model(str(tmp_path / "model.json"))
    fitted = resolve_noise_model(str(CHIP / "reram_wan2022_*.csv"), degree=3)
    assert fitted.kind == "fitted"
    (tmp_path / "model.json").write_text(json.dumps(fitted.to_json()))
    loaded = load_noise_model(tmp_path / "model.json")
    assert torch.equal(loaded.prog_sigma(t64([10.0])), fitted.prog_sigma(t64([10.0])))
    assert resolve_noise_model(str(tmp_path / "model.json")).g_max == fitted.g_max


# ---- sanity gates: data that cannot be a noise measurement is refused, naming the rows ------------
def _levels_csv(path, rows):
    path.write_text("g_target_uS,g_measured_uS\n" + "".join(f"{g},{x}\n" for g, x in rows))
    return load_measurements(path)


def _clean_rows(rng, levels=(2, 4, 6, 8, 10, 12), n=40, sd=0.2):
    return [(g, f"{g + sd * rng.standard_normal():.4f}") for g in levels for _ in range(n)]


def test_reads_stuck_at_one_value_are_refused(tmp_path):
    m = _levels_csv(tmp_path / "stuck.csv", [(g, "5.0") for g in (2, 4, 6, 8, 10, 12) for _ in range(20)])
    with pytest.raises(UserError, match=r"stuck\.csv, line 2: level 2 uS: all 20 reads have the same value "
                                        r"\(zero spread.*\(6 of 6 levels"):
        fit_noise(m, degree=2)
    # one stuck level among good ones is named too
    rng = np.random.default_rng(0)
    rows = [r for r in _clean_rows(rng) if r[0] != 8] + [(8, "8.0")] * 40
    with pytest.raises(UserError, match="level 8 uS: all 40 reads have the same value"):
        fit_noise(_levels_csv(tmp_path / "one.csv", rows), degree=2)


def test_one_row_in_another_unit_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    rows = _clean_rows(rng)
    rows[45] = (rows[45][0], f"{float(rows[45][1]) * 1000:.4f}")  # that read in nS
    with pytest.raises(UserError, match="unit"):
        fit_noise(_levels_csv(tmp_path / "nS_row.csv", rows), degree=2)


def test_spread_above_g_max_and_offset_near_g_max_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    good = [r for r in _clean_rows(rng) if r[0] != 2]
    # level 2: most reads at 2, one at 150: spread ~23 uS, above g_max 12 uS, offset 3.7 uS
    wild = [(2, "150" if i == 7 else "2.0000") for i in range(40)]
    wild = [(2, f"{float(x) + 0.01 * i:.4f}") for i, (_, x) in enumerate(wild)]
    with pytest.raises(UserError, match=r"programming sigma reaches .* above g_max \(12 uS\).*level 2 uS"):
        fit_noise(_levels_csv(tmp_path / "wild.csv", good + wild), degree=2)
    off = [r for r in _clean_rows(rng) if r[0] != 4] + [(4, f"{11 + 0.2 * rng.standard_normal():.4f}")
                                                        for _ in range(40)]
    with pytest.raises(UserError, match=r"off\.csv, line \d+: level 4 uS: mean \(measured - target\) is [67][.0-9]* uS, more than "
                                        r"0.5 x g_max \(12 uS\)"):
        fit_noise(_levels_csv(tmp_path / "off.csv", off), degree=2)


def test_fit_worse_than_a_constant_is_refused(tmp_path):
    from romer.cim import noise_fit as nf

    rng = np.random.default_rng(3)
    m = _levels_csv(tmp_path / "ok.csv", _clean_rows(rng))
    fit = fit_noise(m, degree=1)  # the real fit passes
    assert fit["fit"]["r2"] >= 0 or fit["fit"]["degree"] == 0
    levels = fit["levels"]
    use = np.ones(len(levels), dtype=bool)
    coef = np.array([0.2, 0.0])
    grid = np.full(10, 0.2)
    with pytest.raises(UserError, match=r"R² = -3 < 0, the degree-1 sigma\(g\) fits worse than a constant.*ok\.csv, line"):
        nf._check_fit(m, levels, use, 1, coef, -3.0, grid, 12.0)
    nf._check_fit(m, levels, use, 0, coef, -3.0, grid, 12.0)  # degree 0: R² is 0 by construction


def test_degree_needs_two_levels_per_coefficient(tmp_path):
    rng = np.random.default_rng(4)
    m = _levels_csv(tmp_path / "six.csv", _clean_rows(rng))
    fit_noise(m, degree=2)  # 6 levels, 3 coefficients
    with pytest.raises(UserError, match=r"6 programmed level\(s\), but a degree-3 polynomial \(4 coefficients\) needs at "
                                        r"least 8 .*at most 2"):
        fit_noise(m, degree=3)


def test_bundled_samples_pass_the_gates():
    for name, degree in (("pcm_sample.csv", 2), ("reram_wan2022_sample.csv", 3), ("reram_milo2021_sample.csv", 2)):
        fit = fit_noise(load_measurements(CHIP / name), degree=degree)
        assert fit["fit"]["r2"] > 0.5, name
