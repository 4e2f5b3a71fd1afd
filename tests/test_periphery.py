"""The periphery of the analog arrays (romer.cim.periphery): aihwkit parity, DAC/ADC/noise/bound management,
seeding and batch independence, and the model path (nn.Linear and transformers' fused experts under grouped_mm)."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from romer.cim.mapping import AnalogWeights
from romer.cim.noise_models import pcm_joshi2020
from romer.cim.periphery import PRESETS, Periphery, PeripheryConfig, out_rel_err, periphery_config
from romer.cim.sources import resolve_noise_model
from romer.cim.stats import no_noise, noise_stats
from romer.core.records import AnalogTensor as AT

REPO = Path(__file__).resolve().parent.parent
PCM = pcm_joshi2020()
IO = "aihwkit-io-default"
HWA = "aihwkit-hwa"

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- parity with aihwkit's figures (docs/noise.md), 512 x 512 N(0,1), seed 0 -------------------------------
@pytest.mark.parametrize("t, key, lo, hi", [
    (25.0, "rel_err_row_std", 0.0350, 0.0372),
    (25.0, "gain", 0.985, 0.993),
    (86420.0, "rel_err_row_std", 0.0450, 0.0475),
    (86420.0, "gain", 0.993, 0.998),
])
def test_pcm_preset_row_scaling_matches_aihwkit(t, key, lo, hi):
    r = noise_stats(PCM, t, weight_scaling="row")
    assert r["weight_scaling"] == "row" and r["rows"] == r["cols"] == 512 and r["seed"] == 0
    assert lo <= r[key] <= hi, (t, key, r[key])


@pytest.mark.parametrize("t, target, tol", [(25.0, 0.145, 0.006), (86420.0, 0.184, 0.007)])
def test_pcm_preset_tile_scaling_matches_aihwkit(t, target, tol):
    r = noise_stats(PCM, t, weight_scaling="tile")
    assert abs(r["weight_rel_err"] - target) <= tol, r["weight_rel_err"]


def test_drift_compensation_alpha_grows_with_time():
    a25 = noise_stats(PCM, 25.0)["alpha"]
    aday = noise_stats(PCM, 86420.0)
    assert 1.0 < a25 < 1.05 and 1.3 < aday["alpha"] < 1.8
    assert aday["alpha_range"][0] <= aday["alpha"] <= aday["alpha_range"][1]
    off = noise_stats(PCM, 86420.0, drift_compensation=False)
    assert off["alpha"] == 1.0 and off["gain"] < 0.8  # uncompensated drift shrinks the weights


@pytest.mark.parametrize("preset, key, target, tol", [
    (IO, "out_rel_err", 0.0442, 0.0015),
    (HWA, "out_rel_err_vs_clipped_input", 0.0356, 0.0015),
])
def test_periphery_alone_matches_aihwkit(preset, key, target, tol):
    r = noise_stats(no_noise(), 25.0, periphery=preset)
    assert r["weight_rel_err"] < 1e-5  # no device noise: the weights are the clean ones
    assert abs(r[key] - target) <= tol, r[key]
    assert r["periphery"]["name"] == preset


def test_ideal_periphery_is_exact():
    r = noise_stats(no_noise(), 25.0, periphery="ideal")
    assert r["out_rel_err"] < 1e-5


@pytest.fixture(scope="module")
def fitted():
    return resolve_noise_model(str(REPO / "data/chip/pcm_sample.csv"))


def test_fitted_sample_matches_the_preset_at_one_day(fitted):
    assert fitted.kind == "fitted" and fitted.has_drift and fitted.has_read_noise
    got, ref = noise_stats(fitted, 86420.0), noise_stats(PCM, 86420.0)
    assert abs(got["rel_err_row_std"] / ref["rel_err_row_std"] - 1) < 0.05, (got["rel_err_row_std"], ref["rel_err_row_std"])
    assert abs(got["gain"] - ref["gain"]) < 0.01, (got["gain"], ref["gain"])


# ---- one Linear through the periphery -------------------------------------------------------------------
def linear(n_in, n_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out, bias=False).requires_grad_(False)
    lin.weight.copy_(torch.randn(n_out, n_in, generator=g))
    return lin


def inputs(n, n_in, seed=1, spread=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    if spread:  # rows of very different magnitudes: per-row noise management matters
        x *= torch.pow(10.0, torch.rand(n, 1, generator=g) * 4 - 2)
    return x


def analog(lin, noise=None, tile=None, scaling="tile", seed=0, **kw):
    aw = AnalogWeights([AT("w", "attention", lin.weight, layer=0, part="w")], noise or no_noise(), tile=tile,
                       weight_scaling=scaling)
    aw.apply(seed, **kw)
    return aw


def through(lin, aw, cfg, x, seed=0):
    per = Periphery(aw, cfg).install(lin)
    per.reseed(seed)
    per.enabled = True
    try:
        with torch.no_grad():
            return lin(x)
    finally:
        per.remove()


def test_presets_and_config_validation():
    assert PeripheryConfig().ideal and PRESETS["ideal"].ideal
    assert not PRESETS[IO].ideal and not PRESETS[HWA].ideal
    assert PRESETS[IO].weight_scaling == "tile" and PRESETS[HWA].weight_scaling == "row"
    assert periphery_config(IO, out_noise=None) is PRESETS[IO]  # None: the preset's value
    assert periphery_config(IO, out_noise=0.0).out_noise == 0.0
    for kw, needle in (({"noise_management": "max"}, "noise_management"),
                       ({"bound_management": "always"}, "bound_management"),
                       ({"inp_res": 1.0}, "inp_res"), ({"out_noise": -0.1}, "out_noise"),
                       ({"inp_bound": 0.0}, "inp_bound"), ({"w_noise": math.nan}, "w_noise")):
        with pytest.raises(ValueError, match=needle):
            PeripheryConfig(**kw)


def test_seeded_and_deterministic():
    lin = linear(96, 40)
    aw = analog(lin, PCM, tile=(32, 32), t_inference_s=86400.0)
    x = inputs(64, 96)
    y0 = through(lin, aw, PRESETS[IO], x, seed=0)
    assert torch.equal(y0, through(lin, aw, PRESETS[IO], x, seed=0))
    y1 = through(lin, aw, PRESETS[IO], x, seed=1)
    assert not torch.equal(y0, y1)
    digital = x @ lin.weight.t()  # the noisy weights, no periphery
    assert 0.005 < out_rel_err(y0, digital) < 0.2 and 0.005 < out_rel_err(y1, digital) < 0.2
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight))  # removed: nothing intercepts any more


def test_one_periphery_stream_restarts_at_reseed_and_disabled_is_digital():
    lin = linear(64, 32)
    aw = analog(lin, tile=(32, 32))
    x = inputs(16, 64)
    per = Periphery(aw, PRESETS[IO]).install(lin)
    try:
        per.reseed(5)
        per.enabled = True
        with torch.no_grad():
            a, b = lin(x), lin(x)
            per.reseed(5)
            c = lin(x)
            per.enabled = False
            d = lin(x)
        assert not torch.equal(a, b)  # the stream goes on between calls
        assert torch.equal(a, c)  # and restarts at reseed
        assert torch.equal(d, F.linear(x, lin.weight))
    finally:
        per.remove()


@pytest.mark.parametrize("preset", [IO, HWA])
def test_a_row_does_not_depend_on_its_batch(preset):
    """Noise management, DAC, ADC and bound management act per input row. (The noise draws follow the
    position in the stream, so the output noise and the per-MVM weight noise are off here.)"""
    cfg = periphery_config(preset, out_noise=0.0, w_noise=0.0, out_bound=2.0, bound_management="iterative")
    assert cfg.inp_res > 0 and cfg.out_res > 0
    lin = linear(96, 48)
    aw = analog(lin, PCM, tile=(32, 16), scaling=cfg.weight_scaling, t_inference_s=3600.0)
    x = inputs(40, 96, spread=True)
    y = through(lin, aw, cfg, x)
    tol = dict(rtol=1e-5, atol=1e-6)
    for i in (0, 7, 39):
        assert torch.allclose(through(lin, aw, cfg, x[i:i + 1])[0], y[i], **tol), i
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(through(lin, aw, cfg, x[perm]), y[perm], **tol)
    assert torch.allclose(through(lin, aw, cfg, x[:20]), y[:20], **tol)
    # the rows that clipped were rerun (bound management touched this batch)
    none = through(lin, aw, periphery_config(preset, out_noise=0.0, w_noise=0.0, out_bound=2.0,
                                             bound_management="none"), x)
    assert not torch.allclose(none, y, **tol)


def test_bound_management_recovers_clipped_outputs():
    lin = linear(256, 128)
    w = lin.weight.clone()
    aw = analog(lin, tile=(128, 64))
    x = inputs(512, 256)
    ref = x @ w.t()
    err = {bm: out_rel_err(through(lin, aw, periphery_config(IO, out_noise=0.0, out_bound=1.0,
                                                             bound_management=bm), x), ref)
           for bm in ("none", "iterative")}
    assert err["none"] > 0.2  # outputs clip at 1
    assert err["iterative"] < 0.25 * err["none"], err
    wide = out_rel_err(through(lin, aw, periphery_config(IO, out_noise=0.0, bound_management="none"), x), ref)
    assert wide < 0.05  # the preset's out_bound 12 rarely clips


def test_adc_quantises_and_clips_the_normalised_array_output():
    lin = linear(64, 32)
    aw = analog(lin)  # one array, tile scaling: scale = max |W|
    ws = float(aw.scale("w").flatten()[0])
    assert ws == float(lin.weight.abs().max())
    x = inputs(256, 64)
    cfg = PeripheryConfig(out_res=1 / 510, out_bound=3.0)
    y = through(lin, aw, cfg, x)
    s = x.abs().amax(-1, keepdim=True)  # abs_max noise management
    yn = y / (s * ws)
    step = 1 / 510 * 2 * 3.0
    assert (yn / step - (yn / step).round()).abs().max() < 1e-3
    assert yn.abs().max() <= 3.0 + 1e-5 and (yn.abs() > 3.0 - 1e-4).any()  # clipped at out_bound


def test_dac_quantises_the_normalised_input():
    lin = linear(64, 32)
    aw = analog(lin)
    x = inputs(128, 64)
    cfg = PeripheryConfig(inp_res=1 / 126)
    y = through(lin, aw, cfg, x)
    s = x.abs().amax(-1, keepdim=True)
    d = 1 / 126 * 2
    xq = (x / s / d).round() * d * s
    assert torch.allclose(y, xq @ lin.weight.t(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, x @ lin.weight.t(), rtol=1e-4, atol=1e-4)


POOL = {"noise_pool_log2": 0} if "noise_pool_log2" in PeripheryConfig.__dataclass_fields__ else None


@pytest.mark.parametrize("pool", [{}, POOL], ids=["default", "fresh-normals"])
def test_output_noise_and_weight_read_noise_have_their_stated_size(pool):
    if pool is None:
        pytest.skip("no noise pool in this version")
    lin = linear(128, 64)
    w = lin.weight.clone()
    aw = analog(lin)
    x = inputs(1024, 128)
    s = x.abs().amax(-1, keepdim=True)
    ws = float(w.abs().max())
    d = (through(lin, aw, PeripheryConfig(out_noise=0.06, **pool), x) - x @ w.t()) / (s * ws)
    assert abs(float(d.std()) / 0.06 - 1) < 0.03 and abs(float(d.mean())) < 0.003
    d = (through(lin, aw, PeripheryConfig(w_noise=0.0175, **pool), x) - x @ w.t()) / (s * ws)
    den = ((x / s) ** 2 @ (w.abs() / ws).t()).sqrt()  # sqrt(sum |W_n| x_n^2)
    assert abs(float((d / den).std()) / 0.0175 - 1) < 0.03
    # two matmuls of one state draw different noise
    per = Periphery(aw, PeripheryConfig(out_noise=0.06, **pool)).install(lin)
    try:
        per.reseed(0)
        per.enabled = True
        with torch.no_grad():
            n1, n2 = lin(x) - x @ w.t(), lin(x) - x @ w.t()
    finally:
        per.remove()
    assert abs(float(torch.corrcoef(torch.stack([n1.flatten(), n2.flatten()]))[0, 1])) < 0.02


def test_every_input_array_has_its_own_noise_management():
    """With tiles, each input array gets its own abs-max input scale and its own output scale."""
    lin = linear(64, 16)
    aw = analog(lin, tile=(32, 16))
    x = inputs(64, 64)
    x[:, 32:] *= 1e-3  # the second array's inputs are tiny: with one abs-max they would quantise to 0
    cfg = PeripheryConfig(inp_res=1 / 126)
    y = through(lin, aw, cfg, x)
    d = 1 / 126 * 2
    xq = torch.cat([(xs / s / d).round() * d * s for xs in (x[:, :32], x[:, 32:])
                    for s in [xs.abs().amax(-1, keepdim=True)]], dim=1)
    assert torch.allclose(y, xq @ lin.weight.t(), rtol=1e-5, atol=1e-6)


def test_periphery_arrays_are_the_mapping_arrays():
    """10 inputs on arrays of 6 rows: arrays [0:6] and [6:10]. All weights 1, inputs 1, out_bound 5: the first
    array reads 6 and clips at 5, the second reads 4, so the periphery gives 9 (it gives 10 when it cuts the
    inputs into [0:5] and [5:10], which do not clip)."""
    lin = torch.nn.Linear(10, 1, bias=False).requires_grad_(False)
    lin.weight.fill_(1.0)
    aw = analog(lin, tile=(6, 1))
    assert aw.scale("w").shape == (1, 1, 2) and aw.input_tile(10) == 6
    y = through(lin, aw, PeripheryConfig(out_bound=5.0, noise_management="none"), torch.ones(1, 10))
    assert float(y) == pytest.approx(9.0)


def test_ideal_periphery_is_the_digital_matmul():
    lin = linear(80, 24)
    aw = analog(lin, PCM, tile=(32, 8), scaling="row", t_inference_s=86400.0)
    x = inputs(32, 80, spread=True)
    y = through(lin, aw, PeripheryConfig(), x)
    # float32 rounding of the per-array partial sums (and of the scale round trips) only
    assert torch.allclose(y, x @ lin.weight.t(), rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def test_digital_linear_bypasses_the_periphery():
    lin = linear(48, 16)
    clean = lin.weight.clone()
    aw = analog(lin, PCM, tile=(16, 16), t_inference_s=86400.0)
    aw.keep_digital("w", 0)
    assert torch.equal(lin.weight, clean) and bool(aw.digital_mask("w").all())
    x = inputs(8, 48)
    assert torch.equal(through(lin, aw, PRESETS[IO], x), F.linear(x, clean))


# ---- fused experts under torch._grouped_mm ----------------------------------------------------------------
def fused(E=4, out=24, n_in=48, noise=None, tile=(16, 16), scaling="tile", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, out, n_in, generator=g)
    aw = AnalogWeights([AT("e", "routed_experts", w, layer=0, part="gate_up_proj")], noise or PCM, tile=tile,
                       weight_scaling=scaling)
    aw.apply(seed, t_inference_s=86400.0)
    return w, aw


def grouped(per, x, w, counts):
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    with torch.no_grad(), per:
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


def test_digital_experts_bypass_the_periphery():
    w, aw = fused()
    aw.keep_digital("e", 1)
    clean = aw.clean("e")
    assert torch.equal(w[1], clean[1]) and aw.digital_mask("e").tolist() == [False, True, False, False]
    counts = [5, 7, 0, 6]
    x = inputs(sum(counts), 48)
    per = Periphery(aw, PRESETS[IO])
    per.reseed(0)
    y = grouped(per, x, w, counts)
    rows = slice(5, 12)  # expert 1's rows
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    assert torch.equal(y[rows], torch._grouped_mm(x, clean.transpose(-2, -1), offs=offs)[rows])  # exact
    for e, sl in ((0, slice(0, 5)), (3, slice(12, 18))):  # analog experts: noisy weights and the periphery
        digital = x[sl] @ w[e].t()
        assert 0.003 < out_rel_err(y[sl], digital) < 0.3
        assert out_rel_err(y[sl], x[sl] @ clean[e].t()) > 0.02


def test_grouped_rows_match_the_linear_path_per_expert():
    """Each row of a grouped matmul is handled with its own expert's array scales, as a Linear would be."""
    cfg = periphery_config(IO, out_noise=0.0)  # deterministic: DAC, ADC, bound management
    w, aw = fused(noise=no_noise())
    counts = [3, 0, 9, 4]
    x = inputs(sum(counts), 48, spread=True)
    per = Periphery(aw, cfg)
    per.reseed(0)
    y = grouped(per, x, w, counts)
    start = 0
    for e, n in enumerate(counts):
        if n:
            lin = torch.nn.Linear(48, 24, bias=False).requires_grad_(False)
            lin.weight.copy_(aw.clean("e")[e])
            law = analog(lin, tile=(16, 16))
            assert torch.allclose(law.scale("w")[0], aw.scale("e")[e])
            ref = through(lin, law, cfg, x[start:start + n])
            assert torch.allclose(y[start:start + n], ref, rtol=1e-5, atol=1e-5), e
        start += n


def test_grouped_path_runs_for_any_array_size():
    cfg = periphery_config(IO, out_noise=0.0)
    w, aw = fused(n_in=12, tile=(6, 24), noise=no_noise())
    counts = [3, 0, 9, 4]
    x = inputs(sum(counts), 12)
    per = Periphery(aw, cfg)
    per.reseed(0)
    y = grouped(per, x, w, counts)
    digital = torch.cat([x[:3] @ w[0].t(), x[3:12] @ w[2].t(), x[12:] @ w[3].t()])
    assert out_rel_err(y, digital) < 0.05


# ---- a tiny OLMoE model: attention, router and fused experts all go through the periphery -----------------
@pytest.fixture(scope="module")
def olmoe():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import build

    from romer.moe.adapters import analog_tensors, get_adapter

    model = build("olmoe")
    assert model.config._experts_implementation == "grouped_mm"
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model(ids).logits
    recs = analog_tensors(model, get_adapter(model), ["routed_experts", "router", "attention"])
    return model, ids, clean, recs


@pytest.fixture
def calls(monkeypatch):
    seen = {"grouped": [], "linear": []}
    g0, l0 = Periphery._grouped, Periphery._linear

    def g(self, x, w_t, offs, rec, out_dtype):
        seen["grouped"].append(rec.name)
        return g0(self, x, w_t, offs, rec, out_dtype)

    def lin(self, x, w, bias, rec):
        seen["linear"].append(rec.name)
        return l0(self, x, w, bias, rec)

    monkeypatch.setattr(Periphery, "_grouped", g)
    monkeypatch.setattr(Periphery, "_linear", lin)
    return seen


def model_logits(model, ids, recs, cfg, noise=None, seed=0, enabled=True):
    aw = AnalogWeights(recs, noise or no_noise(), tile=(16, 16), weight_scaling=cfg.weight_scaling)
    aw.apply(seed, t_inference_s=86400.0)
    per = Periphery(aw, cfg).install(model)
    per.reseed(seed)
    per.enabled = enabled
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        per.remove()
        aw.restore()


def test_model_periphery_reaches_every_analog_matmul(olmoe, calls):
    model, ids, clean, recs = olmoe
    y = model_logits(model, ids, recs, PRESETS[IO])
    fused_names = {r.name for r in recs if r.fused}
    other = {r.name for r in recs if not r.fused}
    assert len(fused_names) == 4 and len(other) == 10  # 2 layers x (gate_up, down) and (q, k, v, o, router)
    assert sorted(calls["grouped"]) == sorted(fused_names)  # each once per forward
    assert sorted(calls["linear"]) == sorted(other)
    rel = float((y - clean).norm() / clean.norm())
    assert 0.01 < rel < 0.2, rel  # the periphery alone (no device noise): a small error
    with torch.no_grad():
        assert torch.equal(model(ids).logits, clean)  # removed and restored: the clean model


def test_model_ideal_periphery_equals_clean(olmoe, calls):
    model, ids, clean, recs = olmoe
    y = model_logits(model, ids, recs, PeripheryConfig())
    assert len(calls["grouped"]) == 4 and len(calls["linear"]) == 10  # enabled: it runs, exactly
    assert torch.allclose(y, clean, rtol=1e-4, atol=1e-5)


def test_model_periphery_disabled_is_not_invoked(olmoe, calls):
    model, ids, clean, recs = olmoe
    y = model_logits(model, ids, recs, PRESETS[IO], enabled=False)
    assert calls == {"grouped": [], "linear": []}
    assert torch.allclose(y, clean, rtol=1e-5, atol=1e-5)  # no device noise, no periphery


def test_model_periphery_is_deterministic_with_device_noise(olmoe):
    model, ids, clean, recs = olmoe
    a = model_logits(model, ids, recs, PRESETS[IO], noise=PCM, seed=3)
    b = model_logits(model, ids, recs, PRESETS[IO], noise=PCM, seed=3)
    c = model_logits(model, ids, recs, PRESETS[IO], noise=PCM, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float((a - clean).norm() / clean.norm()) > 0.01


def test_experiment_installs_the_periphery_and_keeps_digital_experts_exact(olmoe):
    from romer.core.params import Params
    from romer.pipeline.experiment import Experiment

    model, ids, clean, recs = olmoe
    params = Params(cim={"analog": ["routed_experts", "router", "attention"], "tile": [16, 16], "range_crest": None})
    exp = Experiment(params, model=model, noise_model=no_noise())
    try:
        assert exp.periphery is not None and exp.periphery_config.name == IO
        assert exp.weights.weight_scaling == "tile"  # weight_scaling null: the preset's mapping
        with torch.no_grad():
            exp.set_state(0)
            a = model(ids).logits
            exp.set_state(0)
            b = model(ids).logits
            exp.set_state(None)
            c = model(ids).logits
        assert torch.equal(a, b)  # the periphery stream restarts with every state
        with torch.no_grad():
            exp.set_state(0)
            model(ids)  # a calibration pass consumes the stream ...
            exp.restart_periphery()  # ... which Experiment.calibrate / logit_percentiles restart after them
            assert torch.equal(model(ids).logits, a)  # so every method on a chip sees the same stream
            exp.set_state(None)
        assert 0.01 < float((a - clean).norm() / clean.norm()) < 0.2
        assert torch.allclose(c, clean, rtol=1e-5, atol=1e-5) and not exp.periphery.enabled
    finally:
        exp.restore()
        exp.periphery.remove()
    # range_crest (default 12): full scale at max(abs-max, 12 rms) leaves the typical weights a smaller part of
    # the ADC range, so the same periphery costs more
    crest = Experiment(Params(cim={"analog": ["routed_experts", "router", "attention"], "tile": [16, 16]}),
                       model=model, noise_model=no_noise())
    try:
        assert crest.weights.range_crest == 12.0
        with torch.no_grad():
            crest.set_state(0)
            d = model(ids).logits
        assert float((d - clean).norm() / clean.norm()) > 1.5 * float((a - clean).norm() / clean.norm())
    finally:
        crest.restore()
        crest.periphery.remove()
    ideal = Experiment(Params(cim={"periphery": {"preset": "ideal"}}), model=model, noise_model=no_noise())
    assert ideal.periphery is None  # the ideal periphery costs nothing: no hooks at all


def test_an_all_zero_row_reads_zero_not_nan():
    """Row scaling gives an all-zero row w_max 0: its outputs are exactly 0 (no 0 * inf)."""
    lin = linear(32, 8)
    with torch.no_grad():
        lin.weight[3] = 0
    aw = analog(lin, scaling="row")
    y = through(lin, aw, PRESETS["aihwkit-hwa"], inputs(64, 32))
    assert not torch.isnan(y).any() and float(y[:, 3].abs().max()) == 0.0


def test_an_eager_experts_loop_uses_each_matrix_own_scale():
    """F.linear on one matrix of a fused record (transformers' eager experts): that matrix's scale and digital flag."""
    w = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    w[1] *= 100
    t = torch.nn.Parameter(w.clone(), requires_grad=False)
    aw = AnalogWeights([AT("e", "routed_experts", t, layer=0, part="gate_up_proj")], no_noise(), weight_scaling="tile")
    aw.apply(0)

    class Loop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = t

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w[1])

    m = Loop()
    x = inputs(256, 32)
    y = through(m, aw, periphery_config(IO, out_noise=0.0), x)
    err = float((y - x @ w[1].t()).norm() / (x @ w[1].t()).norm())
    assert 0.001 < err < 0.03  # DAC and ADC of a normal array; expert 0's scale (100x smaller) would clip it all
    aw.keep_digital("e", 1)
    assert torch.equal(through(m, aw, periphery_config(IO), x), x @ t[1].t())


def test_unsupported_experts_kernels_are_refused():
    from romer.core.errors import UserError

    lin = linear(8, 4)
    lin.config = type("C", (), {"_experts_implementation": "batched_mm"})()
    with pytest.raises(UserError, match="grouped_mm' or 'eager'"):
        Periphery(analog(lin), PRESETS[IO]).install(lin)


@pytest.mark.parametrize("preset", ["aihwkit-io-default", "aihwkit-hwa"])
def test_compiled_kernels_agree_with_the_eager_fallback(olmoe, preset, monkeypatch):
    """The fused DAC/ADC kernels (torch.compile) give the bytes of the same functions run eagerly."""
    from romer.cim import kernels

    model, ids, clean, recs = olmoe
    compiled = model_logits(model, ids, recs, PRESETS[preset], noise=PCM, seed=5)
    if kernels.dac.failed or kernels.adc.failed:
        pytest.skip("torch.compile is not available here: the kernels run eagerly")
    for k in (kernels.dac, kernels.adc):
        monkeypatch.setattr(k, "failed", True)
    eager = model_logits(model, ids, recs, PRESETS[preset], noise=PCM, seed=5)
    assert torch.equal(compiled, eager)
    assert float((compiled - clean).norm() / clean.norm()) > 0.01


_CACHE_CHILD = r"""
import romer, torch
from romer.cim import kernels
torch.manual_seed(0)
x = torch.randn(512, 32)
a = kernels.dac(x, None, 1 / 126, 63.0, True, False, False)
b = kernels._dac(x, None, 1 / 126, 63.0, True, False, False)
print(torch.backends.cpu.get_cpu_capability(), torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]))
"""


def test_compiled_kernels_do_not_cross_cpu_capabilities(tmp_path):
    """torch.compile's disk cache ignores the CPU capability: a native (AVX-512) process, then a pinned
    (AVX2) one, on one cache, must each still compute what the eager function does (before the per-
    capability cache directory the second one returned wrong scales, and the reverse order aborted)."""
    import os
    import subprocess
    import sys

    from romer.core.numerics import PINS

    def child(native: bool):
        env = {k: v for k, v in os.environ.items() if k not in PINS}
        env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path), **({"ROMER_NUMERICS": "native"} if native else {}))
        r = subprocess.run([sys.executable, "-c", _CACHE_CHILD], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()

    first = child(native=True)
    if first[0] == "AVX2":
        pytest.skip("this CPU's native capability is AVX2, the pinned one: nothing to cross")
    second = child(native=False)
    third = child(native=True)
    assert first[1] == "True", first
    assert second == ["AVX2", "True"], second
    assert third[1] == "True", third
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("romer-")) == sorted(
        {f"romer-{first[0].lower()}", "romer-avx2"})


# ---- digital per-column calibration (the affine_columns baseline) ------------------------------------------
def test_column_calibration_undoes_a_per_column_gain_error_linear_and_grouped():
    """A gain error per output column (what a chip's digital periphery calibrates) is fitted from the
    periphery's outputs against the clean weights' exact outputs, and undone; other columns keep 1."""
    cfg = periphery_config(IO, out_noise=0.0)
    lin = linear(48, 24)
    aw = analog(lin, tile=(16, 16))
    gains = torch.linspace(0.6, 1.4, 24)
    with torch.no_grad():
        lin.weight.mul_(gains[:, None])
    per = Periphery(aw, cfg).install(lin)
    per.reseed(0)
    per.enabled = True
    x_fit, x = inputs(512, 48, seed=2), inputs(64, 48, seed=3)
    ideal = F.linear(x, aw.clean("w"))
    with torch.no_grad():
        before = lin(x)
        per.start_column_fit()
        lin(x_fit)
        g, c = per.finish_column_fit()["w"]
        after = lin(x)
    per.remove()
    assert torch.allclose(g[0], 1 / gains, rtol=0.02) and c.abs().max() < 0.05
    assert out_rel_err(after, ideal) < 0.05 < out_rel_err(before, ideal)

    w, aw = fused(noise=no_noise())
    with torch.no_grad():
        w[2].mul_(gains[:, None])  # one expert's columns are off
    counts = [40, 0, 50, 30]
    x = inputs(sum(counts), 48, seed=4)
    per = Periphery(aw, cfg)
    per.reseed(0)
    per.start_column_fit()
    grouped(per, x, w, counts)
    fit = per.finish_column_fit()["e"][0]
    assert torch.allclose(fit[2], 1 / gains, rtol=0.02)
    assert torch.allclose(fit[0], torch.ones(24), atol=0.02) and fit[1].tolist() == [1.0] * 24  # no rows: kept
    y = grouped(per, x, w, counts)
    ideal = torch._grouped_mm(x, aw.clean("e").transpose(-2, -1), offs=torch.cumsum(torch.tensor(counts), 0).int())
    assert out_rel_err(y[40:90], ideal[40:90]) < 0.05


def test_a_wide_matmul_takes_its_output_noise_from_the_pool(monkeypatch):
    """A matmul may read at most 2^(k-4) normals of the pool; a wider one is cut into fewer rows per
    chunk so that it still does, instead of drawing every normal fresh."""
    import romer.cim.periphery as P

    cfg = PeripheryConfig(out_noise=0.06, noise_pool_log2=14)  # 1024 normals per chunk at most
    lin = linear(32, 256)
    aw = analog(lin)
    per = Periphery(aw, cfg)
    assert per._row_chunk(256) == 4 and per._row_chunk(1 << 20) == 1
    assert Periphery(aw, PRESETS[IO])._row_chunk(128) == P.ROW_CHUNK  # the builtin models' chunks
    assert Periphery(aw, PeripheryConfig(out_noise=0.06, noise_pool_log2=0))._row_chunk(4096) == P.ROW_CHUNK
    x = inputs(64, 32)
    drawn = []
    randn = torch.randn

    def counting(*args, **kw):
        drawn.append(args[0])
        return randn(*args, **kw)

    monkeypatch.setattr(P.torch, "randn", counting)  # torch's own: every draw of the pass
    y = through(lin, aw, cfg, x)
    monkeypatch.undo()
    assert drawn == [1 << 14]  # the pool, and nothing fresh
    d = (y - x @ lin.weight.t()) / (x.abs().amax(-1, keepdim=True) * float(lin.weight.abs().max()))
    assert abs(float(d.std()) / 0.06 - 1) < 0.05


@pytest.mark.parametrize("arrays", [1, 3])
def test_the_adc_stores_into_the_output_buffer_as_one_cast(monkeypatch, arrays):
    """The ADC writes straight into the grouped matmul's output buffer, chunk by chunk, with bound
    management rerunning clipped rows in it. A float32 buffer holds the float32 outputs; a bf16 one
    holds them cast once (several input arrays are summed in float32 first), in one chunk or several."""
    import romer.cim.periphery as P

    cfg = periphery_config(IO, out_noise=0.0, out_bound=2.0, bound_management="iterative")
    w, aw = fused(n_in=16 * arrays, noise=no_noise())  # arrays of 16 inputs
    counts = [3, 0, 9, 4]
    x = inputs(sum(counts), 16 * arrays, spread=True)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)

    def run(dtype, c=cfg):
        per = Periphery(aw, c)
        per.reseed(0)
        with torch.no_grad():
            return per._grouped(x, w.transpose(-2, -1), offs, per._lookup(w), dtype)

    ref = run(torch.float32)
    assert not torch.equal(run(torch.float32, replace(cfg, bound_management="none")), ref)  # rows clipped
    assert torch.equal(run(torch.bfloat16), ref.to(torch.bfloat16))
    monkeypatch.setattr(P, "ROW_CHUNK", 5)
    chunked = run(torch.float32)
    assert torch.allclose(chunked, ref, rtol=1e-6, atol=1e-6)  # a row does not depend on its chunk
    assert torch.equal(run(torch.bfloat16), chunked.to(torch.bfloat16))
