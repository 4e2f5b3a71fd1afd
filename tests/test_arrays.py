"""Crossbar arrays (romer.cim.mapping): tiles, row/tile weight scaling, range_crest, per-array drift
compensation, and the seeded array-to-array variation (ArrayVariation)."""

import math

import pytest
import torch

from romer.cim.mapping import AnalogWeights, ArrayVariation
from romer.cim.noise_models import NoiseModel, gaussian, pcm_joshi2020
from romer.cim.stats import no_noise
from romer.core.records import AnalogTensor as AT

PCM = pcm_joshi2020()

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def blocks(n, size):
    """Slices of the arrays along a dim of n."""
    return [slice(a, min(n, a + size)) for a in range(0, n, size)]


def analog(w, noise, name="w", kind="attention", **kw):
    return AnalogWeights([AT(name, kind, w, layer=0, part="w")], noise, **kw)


# ---- arrays and their scales ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 50), (3, 40, 50)])
def test_a_matrix_spans_several_arrays_each_with_its_own_row_scale(shape):
    w = randn(*shape)
    clean = w.clone()
    aw = analog(w, no_noise(), kind="routed_experts", tile=(16, 12), weight_scaling="row")
    aw.apply(0)
    M = 1 if len(shape) == 2 else shape[0]
    s = aw.scale("w")
    assert s.shape == (M, 40, 4)  # ceil(50 / 16) input arrays
    c = clean.view(M, 40, 50)
    for t, sl in enumerate(blocks(50, 16)):
        assert torch.equal(s[:, :, t], c[:, :, sl].abs().amax(-1)), t
    assert torch.allclose(w, clean, rtol=1e-5, atol=1e-6)  # no device noise: the mapping is lossless
    assert aw.input_tile(50) == 16 and aw.input_tile(10) == 10  # a tile larger than the matrix: the matrix


def test_tile_scaling_puts_one_w_max_on_each_array():
    w = randn(40, 50)
    clean = w.clone()
    aw = analog(w, no_noise(), tile=(16, 12), weight_scaling="tile")
    aw.apply(0)
    s = aw.scale("w")[0]
    for o in blocks(40, 12):  # output arrays: 12, 12, 12 and 4 rows
        for t, i in enumerate(blocks(50, 16)):
            assert torch.all(s[o, t] == clean[o, i].abs().max()), (o, t)
    assert len(torch.unique(s)) == 4 * 4
    assert torch.allclose(w, clean, rtol=1e-5, atol=1e-6)


def test_tile_scaling_gives_every_weight_of_an_array_the_same_noise():
    """gaussian(f): w' - w has std f * w_max, w_max per row (row scaling) or per array (tile scaling)."""
    w = randn(256, 256) * torch.logspace(-1, 0, 64).repeat(4).unsqueeze(1)  # rows of very different sizes
    clean = w.clone()
    for scaling in ("row", "tile"):
        w.copy_(clean)
        analog(w, gaussian(0.05), tile=(64, 64), weight_scaling=scaling).apply(0)
        d = w - clean
        for o in blocks(256, 64):
            for i in blocks(256, 64):
                blk = clean[o, i]
                ref = blk.abs().amax(-1, keepdim=True) if scaling == "row" else blk.abs().max()
                assert abs(float((d[o, i] / ref).std()) / 0.05 - 1) < 0.05, (scaling, o, i)
        small, big = d[:16, :64].std(), d[48:64, :64].std()  # first and last rows of one array
        if scaling == "tile":
            assert abs(float(small / big) - 1) < 0.1  # one w_max: the same absolute noise
        else:
            assert float(small / big) < 0.3  # each row its own w_max


def test_range_crest_sets_full_scale_at_crest_times_rms_of_the_valid_weights():
    torch.manual_seed(0)
    w = randn(64, 10)
    w[:, 0] = 20.0  # an outlier column: abs-max far above 3 rms in the first array
    clean = w.clone()
    aw = analog(w, no_noise(), tile=(6, 64), weight_scaling="row", range_crest=3.0)
    aw.apply(0)
    s = aw.scale("w")[0]
    for t, sl in enumerate(blocks(10, 6)):  # arrays of 6 and 4 inputs: the padding is not in the rms
        blk = clean[:, sl]
        full = torch.maximum(blk.abs().amax(-1), 3.0 * blk.square().mean(-1).sqrt())
        assert torch.allclose(s[:, t], full, rtol=1e-5), t
    assert (s[:, 1] > clean[:, 6:].abs().amax(-1)).any()  # the crest raised some full scales
    assert torch.allclose(w, clean, rtol=1e-5, atol=1e-5)  # no noise: still lossless
    with pytest.raises(ValueError, match="range_crest"):
        analog(w, no_noise(), range_crest=0.0)
    # with noise, the noise is relative to the raised full scale
    w2 = randn(512, 64, seed=1)
    c2 = w2.clone()
    analog(w2, gaussian(0.05), weight_scaling="row", range_crest=12.0).apply(0)
    full = torch.maximum(c2.abs().amax(-1, keepdim=True), 12.0 * c2.square().mean(-1, keepdim=True).sqrt())
    assert torch.all(full > c2.abs().amax(-1, keepdim=True))  # N(0,1) rows: 12 rms beats the abs-max
    assert abs(float(((w2 - c2) / full).std()) / 0.05 - 1) < 0.05


def test_a_tile_larger_than_the_matrix_is_one_array():
    """Not padded to the full tile (the builtin model's 128-wide matrices on the default 512 x 512 tile)."""
    a, b, c = randn(4, 20, 30), randn(4, 20, 30), randn(4, 20, 30)
    aw = analog(a, PCM, tile=(512, 512))
    aw.apply(1, t_inference_s=86400.0)
    analog(b, PCM, tile=None).apply(1, t_inference_s=86400.0)
    analog(c, PCM, tile=(10**9, 10**9)).apply(1, t_inference_s=86400.0)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert aw.scale("w").shape == (4, 20, 1)
    d, e = randn(4, 20, 30), randn(4, 20, 30)
    analog(d, PCM, tile=(16, 10**9)).apply(1, t_inference_s=86400.0)  # rows cut, cols one array
    analog(e, PCM, tile=(16, 20)).apply(1, t_inference_s=86400.0)
    assert torch.equal(d, e)


# ---- drift compensation per array ----------------------------------------------------------------------
def mean_drift(nu0=0.2, nu1=0.0):
    """No randomness at prog_scale = read_scale = 0: nu = nu0 + (nu1 - nu0) g / g_max exactly."""
    return NoiseModel(name="mean-drift", kind="json", g_max=25.0, prog_coeffs=list(PCM.prog_coeffs),
                      drift={"law": "table", "g_uS": [0.0, 25.0], "mean": [nu0, nu1], "std": [0.0, 0.0]}, t0=20.0,
                      read={"law": "pcm", "t_read_s": 250e-9})


def two_kinds_of_arrays():
    """[32, 32] in four 16 x 16 arrays: the diagonal arrays hold weights near their w_max (slow drift), the
    others mostly small weights (fast drift)."""
    g = torch.Generator().manual_seed(3)
    sign = torch.randint(0, 2, (32, 32), generator=g) * 2 - 1.0
    mag = torch.rand(32, 32, generator=g) * 0.1
    mag[:16, :16] += 0.85
    mag[16:, 16:] += 0.85
    mag[:, 0] = mag[:, 16] = 1.0
    return sign * mag


def test_drift_compensation_alpha_is_per_array():
    w = two_kinds_of_arrays()
    clean = w.clone()
    aw = analog(w, mean_drift(), tile=(16, 16), weight_scaling="tile")
    aw.apply(0, prog_scale=0.0, read_scale=0.0, t_inference_s=86400.0)
    s = aw.scale("w")[0]  # alpha * w_max per output row and input array
    alphas = []
    for o in blocks(32, 16):
        for t, i in enumerate(blocks(32, 16)):
            assert abs(float(w[o, i].abs().sum() / clean[o, i].abs().sum()) - 1) < 1e-5  # each array restored
            a = s[o, t] / clean[o, i].abs().max()
            assert torch.allclose(a, a[0].expand_as(a))  # one alpha per array
            alphas.append(float(a[0]))
    assert min(alphas) > 1.0 and max(alphas) / min(alphas) > 1.1, alphas  # fast-drifting arrays need more
    # one array per matrix: one alpha, so the arrays are not restored one by one
    w.copy_(clean)
    analog(w, mean_drift(), tile=None, weight_scaling="tile").apply(0, prog_scale=0.0, read_scale=0.0,
                                                                     t_inference_s=86400.0)
    assert abs(float(w.abs().sum() / clean.abs().sum()) - 1) < 1e-5
    assert abs(float(w[:16, :16].abs().sum() / clean[:16, :16].abs().sum()) - 1) > 0.02


def test_drift_compensation_reference_is_the_programmed_state_without_read_noise():
    """alpha = sum|W_prog| / sum|W_t| with W_prog right after programming: with read noise only (no
    programming noise, no drift) W_prog is the target, so the compensated sum |W| is exactly the clean one."""
    nm = NoiseModel(name="read-only", kind="json", g_max=25.0, prog_coeffs=[0.0], clip_at_zero=False, t0=1.0,
                    read={"law": "table", "g_uS": [0.0, 25.0], "t_s": [1.0], "sigma_uS": [[1.5, 1.5]]})
    w = randn(64, 96)
    clean = w.clone()
    aw = analog(w, nm, tile=(32, 32), weight_scaling="tile")
    aw.apply(0, t_inference_s=100.0, drift_compensation=False)
    assert float(w.abs().sum() / clean.abs().sum()) > 1.01  # read noise adds |W|
    aw.apply(0, t_inference_s=100.0)
    for o in blocks(64, 32):
        for i in blocks(96, 32):
            assert abs(float(w[o, i].abs().sum() / clean[o, i].abs().sum()) - 1) < 1e-5


# ---- array-to-array variation --------------------------------------------------------------------------
VAR = ArrayVariation(sigma_spread=0.5, gain_std=0.1, offset_std=0.01, stuck_frac=0.02)


def test_variation_validation_and_off_by_default():
    assert not ArrayVariation().active and VAR.active
    for kw in ({"sigma_spread": -0.1}, {"gain_std": math.nan}, {"stuck_frac": 1.5}, {"offset_std": math.inf}):
        with pytest.raises(ValueError):
            ArrayVariation(**kw)


def test_variation_is_seeded_and_deterministic_and_restores_exactly():
    e = randn(2, 64, 96)
    clean = e.clone()
    aw = analog(e, PCM, name="e", kind="routed_experts", tile=(32, 32), variation=VAR)
    aw.apply(3, t_inference_s=86400.0)
    e3 = e.clone()
    aw.apply(3, t_inference_s=86400.0)
    assert torch.equal(e, e3)
    aw.apply(4, t_inference_s=86400.0)
    assert not torch.equal(e, e3)
    v3, v3b, v4 = aw.array_variation(3, "e"), aw.array_variation(3, "e"), aw.array_variation(4, "e")
    assert set(v3) == {"sigma_mult", "gain", "offset"}
    for k in v3:
        assert v3[k].shape == (2, 2, 3)  # [M, output arrays, input arrays]
        assert torch.equal(v3[k], v3b[k]) and not torch.equal(v3[k], v4[k])
    assert (v3["sigma_mult"] > 0).all()
    aw.restore()
    assert torch.equal(e, clean) and aw.scale("e") is None


def test_variation_all_zero_is_bit_identical_to_none():
    a, b = randn(2, 64, 96), randn(2, 64, 96)
    off = analog(a, PCM, tile=(32, 32), variation=ArrayVariation())
    assert off.variation is None and off.array_variation(0, "w") is None
    off.apply(5, t_inference_s=86400.0)
    analog(b, PCM, tile=(32, 32)).apply(5, t_inference_s=86400.0)
    assert torch.equal(a, b)


def test_sigma_spread_scales_each_arrays_noise_and_keeps_the_device_draws():
    w = randn(256, 256)
    clean = w.clone()
    var = ArrayVariation(sigma_spread=0.5)
    aw = analog(w, gaussian(0.05), tile=(64, 64), weight_scaling="row", variation=var)
    aw.apply(2)
    noisy_var = w.clone()
    w.copy_(clean)
    analog(w, gaussian(0.05), tile=(64, 64), weight_scaling="row").apply(2)
    noisy = w.clone()
    mult = aw.array_variation(2, "w")["sigma_mult"][0]  # [4, 4]
    stds = []
    for a, o in enumerate(blocks(256, 64)):
        for b, i in enumerate(blocks(256, 64)):
            m = float(mult[a, b])
            # the same device draws, scaled by the array's multiplier
            assert torch.allclose(noisy_var[o, i] - clean[o, i], m * (noisy[o, i] - clean[o, i]), rtol=1e-4,
                                  atol=1e-6)
            std = float(((noisy_var[o, i] - clean[o, i]) / clean[o, i].abs().amax(-1, keepdim=True)).std())
            assert abs(std / (0.05 * m) - 1) < 0.05
            stds.append(std)
    assert max(stds) / min(stds) > 1.5  # arrays of different quality


def test_gain_std_changes_each_arrays_gain_and_nothing_else():
    e = randn(2, 64, 96)
    clean = e.clone()
    aw = analog(e, PCM, name="e", kind="routed_experts", tile=(32, 32), variation=ArrayVariation(gain_std=0.1))
    aw.apply(1, t_inference_s=86400.0)
    with_gain, s_gain = e.clone(), aw.scale("e").clone()
    e.copy_(clean)
    ref = analog(e, PCM, name="e", kind="routed_experts", tile=(32, 32))
    ref.apply(1, t_inference_s=86400.0)
    gain = aw.array_variation(1, "e")["gain"]  # [2, 2, 3]
    assert float(gain.std()) > 0.03
    for m in range(2):
        for a, o in enumerate(blocks(64, 32)):
            for b, i in enumerate(blocks(96, 32)):
                assert torch.allclose(with_gain[m, o, i], gain[m, a, b] * e[m, o, i], rtol=1e-4, atol=1e-6)
    # drift compensation sees the gain at programming and at t alike: alpha (and the scale) are unchanged
    assert torch.allclose(s_gain, ref.scale("e"), rtol=1e-5)


def test_offset_std_shifts_each_array_by_its_offset_with_the_same_device_draws():
    w = randn(64, 96)
    clean = w.clone()
    aw = analog(w, gaussian(0.05), tile=(32, 32), weight_scaling="row", variation=ArrayVariation(offset_std=0.02))
    aw.apply(7)
    shifted = w.clone()
    w.copy_(clean)
    analog(w, gaussian(0.05), tile=(32, 32), weight_scaling="row").apply(7)
    off = aw.array_variation(7, "w")["offset"][0]
    assert float(off.abs().max()) > 0.005
    for a, o in enumerate(blocks(64, 32)):
        for b, i in enumerate(blocks(96, 32)):
            w_max = clean[o, i].abs().amax(-1, keepdim=True)  # offset in units of g_max = w_max
            assert torch.allclose(shifted[o, i] - w[o, i], float(off[a, b]) * w_max.expand(-1, 32), rtol=1e-4,
                                  atol=1e-6)


def test_stuck_devices():
    """stuck_frac 0.1: each device of a pair independently stuck with p 0.05 at 0 and 0.05 at g_max. For a
    weight at half of w_max (G+ = g_max/2, G- = 0) that gives w'/w_max = 0.5 (p 0.855), 1 (G+ at g_max, 0.0475),
    0 (G+ at 0, 0.0475, or both at g_max, 0.0025), -0.5 (G- at g_max, 0.045), -1 (0.0025)."""
    w = torch.full((20000, 9), 0.5)
    w[:, 0] = 1.0  # w_max of every row
    aw = analog(w, no_noise(), variation=ArrayVariation(stuck_frac=0.1))
    aw.apply(0)
    q = w[:, 1:].flatten()
    expected = {0.5: 0.855, 1.0: 0.0475, 0.0: 0.05, -0.5: 0.045, -1.0: 0.0025}
    for v, p in expected.items():
        got = float(((q - v).abs() < 1e-5).float().mean())
        assert abs(got - p) < 0.006, (v, got, p)
    assert sum(float(((q - v).abs() < 1e-5).float().mean()) for v in expected) == pytest.approx(1.0, abs=1e-6)
    aw.restore()
    assert torch.equal(w[:, 1:], torch.full((20000, 8), 0.5))
