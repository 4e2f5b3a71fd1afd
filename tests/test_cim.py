"""Weights on CIM arrays (romer.cim.mapping.AnalogWeights): mapping, noise statistics, seeds, restore."""

import math

import pytest
import torch

from romer.cim.mapping import AnalogWeights, tensor_seed
from romer.cim.noise_models import NoiseModel, gaussian, pcm_joshi2020
from romer.core.records import AnalogTensor as AT

PCM = pcm_joshi2020()
PROG_ONLY = NoiseModel(name="prog", kind="json", g_max=25.0, prog_coeffs=list(PCM.prog_coeffs))
LEVELS = [0.1, 0.3, 0.6, 0.9]  # |w| / w_max of the probed weights


pytestmark = pytest.mark.usefixtures("one_thread")


def probe_tensor(rows=20000, shape3d=False):
    """Every row: w_max = 1 at column 0, then +LEVELS, then -LEVELS."""
    w = torch.zeros(rows, 1 + 2 * len(LEVELS))
    w[:, 0] = 1.0
    w[:, 1:1 + len(LEVELS)] = torch.tensor(LEVELS)
    w[:, 1 + len(LEVELS):] = -torch.tensor(LEVELS)
    return w.view(8, rows // 8, -1).clone() if shape3d else w


def halfnormal_var(s):
    """Variance of max(N(0, s^2), 0): the 'off' device of a pair clipped at 0."""
    return s**2 * (0.5 - 1 / (2 * math.pi))


def test_same_seed_bit_identical_different_seed_differs():
    torch.manual_seed(0)
    a = torch.randn(16, 64, 48)
    b = torch.randn(40, 48, dtype=torch.bfloat16)
    aw = AnalogWeights([AT("e", "routed_experts", a), AT("l", "attention", b)], PCM, tile=(16, 64), levels=64)
    aw.apply(3)
    a1, b1 = a.clone(), b.clone()
    aw.apply(3)
    assert torch.equal(a, a1) and torch.equal(b, b1)
    aw.apply(4)
    assert not torch.equal(a, a1) and not torch.equal(b, b1)
    assert b.dtype == torch.bfloat16
    aw.restore()
    assert torch.equal(a, aw.clean("e")) and torch.equal(b, aw.clean("l"))
    assert tensor_seed(3, "e") != tensor_seed(3, "l") != tensor_seed(4, "l")


def test_noise_of_a_tensor_does_not_depend_on_the_others():
    torch.manual_seed(1)
    a, b = torch.randn(32, 32), torch.randn(32, 32)
    AnalogWeights([AT("a", "attention", a)], PCM).apply(7)
    only_a = a.clone()
    torch.manual_seed(1)
    a, b = torch.randn(32, 32), torch.randn(32, 32)
    AnalogWeights([AT("b", "router", b), AT("a", "attention", a)], PCM).apply(7)
    assert torch.equal(a, only_a)


def test_untouched_tensors_and_kinds_filter():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Linear(32, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(48, 24)
    aw = AnalogWeights([AT("0", "attention", net[0].weight), AT("x", "router", x)], gaussian(0.1))
    x0 = x.clone()
    aw.apply(0)
    assert not torch.equal(net[0].weight, before["0.weight"]) and not torch.equal(x, x0)
    for k in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(net.state_dict()[k], before[k])
    aw.apply(0, kinds=["router"])  # attention stays clean
    assert torch.equal(net[0].weight, before["0.weight"]) and not torch.equal(x, x0)
    aw.restore()
    assert torch.equal(net[0].weight, before["0.weight"]) and torch.equal(x, x0)
    assert aw.param_counts() == {"attention": 32 * 24, "router": 48 * 24}
    assert aw.weight_bytes() == 4 * (32 * 24 + 48 * 24)


@pytest.mark.parametrize("shape3d", [False, True])
def test_programming_noise_std_matches_model(shape3d):
    w = probe_tensor(shape3d=shape3d)
    aw = AnalogWeights([AT("w", "routed_experts", w)], PROG_ONLY)
    aw.apply(11)
    d = (w - aw.clean("w")).reshape(-1, w.shape[-1])
    off = halfnormal_var(float(PROG_ONLY.prog_sigma(torch.tensor(0.0))))
    for j, x in enumerate(LEVELS):
        s = float(PROG_ONLY.prog_sigma(torch.tensor(x * 25.0)))
        expected = math.sqrt(s**2 + off) / 25.0  # w_max = 1, g_max = 25
        for col in (1 + j, 1 + len(LEVELS) + j):  # positive (G+) and negative (G-) weights
            assert abs(float(d[:, col].std()) / expected - 1) < 0.05, (x, col)


def test_programming_plus_read_noise_std_matches_model():
    read = {"law": "table", "g_uS": [0.0, 25.0], "t_s": [1.0], "sigma_uS": [[0.2, 0.6]]}
    nm = NoiseModel(name="pr", kind="json", g_max=25.0, prog_coeffs=[0.3, 0.5], clip_at_zero=False,
                    read=read, t0=1.0)
    w = probe_tensor()
    AnalogWeights([AT("w", "attention", w)], nm).apply(5, prog_scale=2.0, read_scale=2.0, t_inference_s=10.0)
    d = w - probe_tensor()
    for j, x in enumerate(LEVELS):
        g = torch.tensor(x * 25.0)
        var = sum(float(f(v)) ** 2 for f in (nm.prog_sigma, lambda v: nm.read_sigma(v, 10.0))
                  for v in (g, torch.tensor(0.0)))
        expected = 2.0 * math.sqrt(var) / 25.0
        assert abs(float(d[:, 1 + j].std()) / expected - 1) < 0.05


def test_gaussian_fraction_is_std_over_row_wmax_per_tile():
    torch.manual_seed(3)
    w = torch.randn(4, 2000, 16)
    w[:, :, :8] *= 10.0  # tile 0 has a 10x larger abs-max than tile 1
    w[1] *= 0.01  # expert 1 is 100x smaller
    clean = w.clone()
    AnalogWeights([AT("e", "routed_experts", w)], gaussian(0.05), tile=(8, 2000)).apply(0)
    d = w - clean
    for e in range(4):
        for sl in (slice(0, 8), slice(8, 16)):
            wmax = clean[e, :, sl].abs().amax(-1, keepdim=True)
            ratio = float((d[e, :, sl] / wmax).std())
            assert abs(ratio / 0.05 - 1) < 0.05, (e, sl, ratio)
    # without tiles, the row abs-max (from tile 0) sets the noise of tile 1 too
    w2 = clean.clone()
    AnalogWeights([AT("e", "routed_experts", w2)], gaussian(0.05)).apply(0)
    rowmax = clean.abs().amax(-1, keepdim=True)
    assert abs(float(((w2 - clean) / rowmax)[..., 8:].std()) / 0.05 - 1) < 0.05


def test_quantisation_levels_and_zero_rows():
    torch.manual_seed(4)
    w = torch.randn(64, 40)
    w[3] = 0.0
    clean = w.clone()
    AnalogWeights([AT("w", "attention", w)], gaussian(0.0), levels=3).apply(0)
    q = w / clean.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    allowed = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert torch.allclose(q[torch.arange(64) != 3].unsqueeze(-1).sub(allowed).abs().amin(-1),
                          torch.zeros(63, 40), atol=1e-6)
    assert torch.equal(w[3], torch.zeros(40))


def mean_drift_model(nu0=0.1, nu1=0.05):
    """PCM programming and read laws, but a deterministic drift exponent: nu = nu0 + (nu1 - nu0) g/g_max, std 0."""
    return NoiseModel(name="mean-drift", kind="json", g_max=25.0, prog_coeffs=list(PCM.prog_coeffs),
                      drift={"law": "table", "g_uS": [0.0, 25.0], "mean": [nu0, nu1], "std": [0.0, 0.0]}, t0=20.0,
                      read={"law": "pcm", "t_read_s": 250e-9})


def test_drift_mean_and_global_compensation():
    w = probe_tensor(4000)
    clean = w.clone()
    w_max = clean.abs().amax(-1)[None, :, None]  # [M, out, n_input_arrays]
    aw = AnalogWeights([AT("w", "routed_experts", w)], mean_drift_model())
    t = 3600.0
    quiet = dict(prog_scale=0.0, read_scale=0.0)  # no random noise: the mean drift only

    def drifted(x, drift_scale=1.0):
        return x * (t / 20.0) ** (-drift_scale * (0.1 - 0.05 * x))

    expected = torch.tensor([drifted(x) for x in LEVELS])
    aw.apply(0, **quiet, t_inference_s=t, drift_compensation=False)
    assert torch.allclose(w[:, 1:1 + len(LEVELS)], expected.expand(4000, -1), rtol=1e-5)
    assert torch.allclose(w[:, 1 + len(LEVELS):], -expected.expand(4000, -1), rtol=1e-5)
    assert torch.allclose(w[:, 0], torch.tensor(drifted(1.0)), rtol=1e-5)
    assert torch.allclose(aw.scale("w"), w_max)  # uncompensated: alpha 1
    uncompensated = w.clone()

    aw.apply(0, **quiet, t_inference_s=t, drift_compensation=True)
    assert abs(float(w.abs().sum() / clean.abs().sum()) - 1) < 1e-5  # mean |W| restored
    alpha = float(clean.abs().sum() / uncompensated.abs().sum())
    assert alpha > 1.2
    assert torch.allclose(w, alpha * uncompensated, rtol=1e-5)
    assert torch.allclose(aw.scale("w"), alpha * w_max, rtol=1e-5)

    # drift_scale multiplies nu itself; 0 switches the drift off
    aw.apply(0, **quiet, drift_scale=2.0, t_inference_s=t, drift_compensation=False)
    assert torch.allclose(w[0, 1:1 + len(LEVELS)], torch.tensor([drifted(x, 2.0) for x in LEVELS]), rtol=1e-5)
    aw.apply(0, **quiet, drift_scale=0.0, t_inference_s=t, drift_compensation=False)
    assert torch.allclose(w, clean, atol=1e-6)
    aw.apply(0, **quiet, t_inference_s=10.0, drift_compensation=False)  # t < t0: no drift
    assert torch.allclose(w, clean, atol=1e-6)

    # the full PCM law (random nu, programming and read noise): compensation still restores mean |W|
    w2 = probe_tensor(4000)
    aw2 = AnalogWeights([AT("w", "routed_experts", w2)], PCM)
    aw2.apply(0, t_inference_s=t, drift_compensation=False)
    assert float(w2.abs().sum() / clean.abs().sum()) < 0.85  # drift shrinks the weights
    aw2.apply(0, t_inference_s=t)
    assert abs(float(w2.abs().sum() / clean.abs().sum()) - 1) < 0.01


def test_drift_exponent_is_folded_and_drift_scale_multiplies_it():
    """nu = |N(mean, std)| * drift_scale (aihwkit): with mean 0 nu is half-normal, no weight ever grows."""
    nm = NoiseModel(name="fold", kind="json", g_max=25.0, prog_coeffs=[0.0],
                    drift={"law": "table", "g_uS": [0.0, 25.0], "mean": [0.0, 0.0], "std": [0.05, 0.05]}, t0=20.0)
    w = probe_tensor(8000)
    aw = AnalogWeights([AT("w", "routed_experts", w)], nm)
    t = 1e6
    col, x = 1 + 2, LEVELS[2]

    def nus():
        return -torch.log(w[:, col] / x) / math.log(t / 20.0)  # each device's exponent, from its drift

    aw.apply(0, t_inference_s=t, drift_compensation=False)
    nu1 = nus()
    assert float(nu1.min()) >= -1e-6
    assert abs(float(nu1.mean()) / (0.05 * math.sqrt(2 / math.pi)) - 1) < 0.05
    aw.apply(0, drift_scale=2.0, t_inference_s=t, drift_compensation=False)
    assert torch.allclose(nus(), 2 * nu1, rtol=1e-3, atol=1e-6)  # the same draws, doubled


def test_edit_replaces_a_slot_with_a_fresh_draw():
    torch.manual_seed(5)
    e = torch.randn(4, 32, 16)
    aw = AnalogWeights([AT("experts", "routed_experts", e)], gaussian(0.05))

    def edit(rec):
        rec.tensor[2].copy_(aw.clean(rec.name)[0])

    aw.apply(9, prog_scale=0.0, read_scale=0.0, edit=edit)
    assert torch.allclose(e[2], aw.clean("experts")[0], atol=1e-6)
    aw.apply(9, edit=edit)
    n0 = e[0] - aw.clean("experts")[0]
    n2 = e[2] - aw.clean("experts")[0]
    assert not torch.allclose(n0, n2)
    aw.apply(9, edit=edit, kinds=[])  # edit without noise
    assert torch.equal(e[2], aw.clean("experts")[0]) and torch.equal(e[1], aw.clean("experts")[1])
    aw.restore()
    assert torch.equal(e, aw.clean("experts"))


def test_blocks_of_matrices_and_non_contiguous_tensors(monkeypatch):
    import romer.cim.mapping as cim

    monkeypatch.setattr(cim, "CPU_CHUNK_ELEMENTS", 1000)  # one [20, 30] matrix per block
    torch.manual_seed(6)
    e = torch.randn(8, 20, 30)
    aw = AnalogWeights([AT("e", "routed_experts", e)], PCM, tile=(7, 6))  # padded arrays both ways
    aw.apply(1, t_inference_s=1e4)
    e1 = e.clone()
    aw.apply(1, t_inference_s=1e4)
    assert torch.equal(e, e1) and not torch.equal(e, aw.clean("e"))
    w = torch.randn(3000, 12).t()  # [12, 3000], not contiguous: written back through a copy
    clean = w.clone()
    AnalogWeights([AT("t", "attention", w)], gaussian(0.05)).apply(2)
    assert not w.is_contiguous()
    assert abs(float(((w - clean) / clean.abs().amax(-1, keepdim=True)).std()) / 0.05 - 1) < 0.05
    f = torch.randn(40, 30, 20).transpose(1, 2)  # fused, not contiguous, in blocks
    clean = f.clone()
    aw = AnalogWeights([AT("f", "routed_experts", f)], gaussian(0.05))
    aw.apply(3)
    f1 = f.clone()
    assert abs(float(((f - clean) / clean.abs().amax(-1, keepdim=True)).std()) / 0.05 - 1) < 0.05
    aw.apply(3)
    assert torch.equal(f, f1)
    aw.restore()
    assert torch.equal(f, clean)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2 dims"):
        AnalogWeights([AT("b", "attention", torch.zeros(4))], PCM)
    with pytest.raises(ValueError, match="duplicate"):
        AnalogWeights([AT("a", "x", torch.zeros(2, 2)), AT("a", "x", torch.zeros(2, 2))], PCM)
    with pytest.raises(ValueError, match="floating point"):
        AnalogWeights([AT("i", "attention", torch.zeros(2, 2, dtype=torch.int64))], PCM)
    for tile in ((0, 4), (4,), (4, 4, 4)):
        with pytest.raises(ValueError, match="tile"):
            AnalogWeights([AT("a", "x", torch.zeros(2, 2))], PCM, tile=tile)
    with pytest.raises(ValueError, match="weight_scaling"):
        AnalogWeights([AT("a", "x", torch.zeros(2, 2))], PCM, weight_scaling="column")
    with pytest.raises(ValueError, match="levels"):
        AnalogWeights([AT("a", "x", torch.zeros(2, 2))], PCM, levels=1)
    a = torch.ones(2, 2)
    aw = AnalogWeights([AT("a", "x", a)], PCM)
    for kw, needle in (({"prog_scale": -1.0}, "prog_scale"), ({"read_scale": math.nan}, "read_scale"),
                       ({"drift_scale": math.inf}, "drift_scale"), ({"t_inference_s": 0.0}, "t_inference_s"),
                       ({"t_inference_s": math.inf}, "t_inference_s")):
        with pytest.raises(ValueError, match=needle):
            aw.apply(0, **kw)
        assert torch.equal(a, torch.ones(2, 2))  # rejected before touching the weights
    with pytest.raises(TypeError):
        aw.apply(0, scale=1.0)  # the old single scale is gone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pinned_copy_and_determinism():
    w = torch.randn(8, 256, 128, device="cuda", dtype=torch.bfloat16)
    clean = w.clone()
    aw = AnalogWeights([AT("e", "routed_experts", w)], PCM, tile=(64, 64))
    assert aw.clean("e").is_pinned() and aw.clean("e").device.type == "cpu"
    aw.apply(1)
    w1 = w.clone()
    aw.apply(1)
    assert torch.equal(w, w1)
    aw.restore()
    assert torch.equal(w, clean)


def _tables(nm):
    """The same device law as tables (a fitted model's form): the compiled noise pass runs it."""
    j = nm.to_json()
    j["preset"] = None
    return NoiseModel.from_json(j)


@pytest.mark.parametrize("case", ["fitted_tile_crest", "poly_row_levels", "variation_padded", "early_uncompensated"])
def test_compiled_noise_pass_agrees_with_the_eager_fallback(case, monkeypatch):
    """The compiled noise pass (romer.cim.mapping.device_chain) gives the bytes of the same
    functions run eagerly, for every branch of the chain; and it is the path a fitted model takes."""
    from romer.cim import mapping
    from romer.cim.mapping import ArrayVariation

    nm, kw, ap = {
        "fitted_tile_crest": (_tables(PCM), dict(tile=(64, 16), weight_scaling="tile", range_crest=3.0),
                              dict(t_inference_s=86400.0)),
        "poly_row_levels": (PROG_ONLY, dict(weight_scaling="row", levels=9), dict(prog_scale=2.0)),
        "variation_padded": (_tables(PCM), dict(tile=(24, 10), weight_scaling="tile",
                                                variation=ArrayVariation(0.3, 0.05, 0.01, 0.02)),
                             dict(t_inference_s=3600.0, read_scale=0.5, drift_scale=3.0)),
        "early_uncompensated": (_tables(PCM), dict(tile=(64, 64)), dict(t_inference_s=10.0, drift_compensation=False)),
    }[case]
    assert nm.curves(ap.get("t_inference_s", 25.0), torch.float32, "cpu")["exact"]
    torch.manual_seed(0)
    clean = [torch.randn(3, 40, 50) * 0.05, torch.randn(70, 33) * 0.05]

    def run():
        ts = [c.clone() for c in clean]
        aw = AnalogWeights([AT(f"t{i}", "routed_experts", t, part=f"p{i}") for i, t in enumerate(ts)], nm, **kw)
        aw.apply(7, **ap)
        return ts + [aw.scale(f"t{i}") for i in range(len(ts))]

    compiled = run()
    if mapping.device_chain.failed:
        pytest.skip("torch.compile is not available here: the noise pass runs eagerly")
    monkeypatch.setattr(mapping.device_chain, "failed", True)
    eager = run()
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    assert not torch.equal(compiled[0], clean[0])


def test_pcm_law_noise_pass_runs_eagerly():
    """The PCM preset's drift law takes a log (MKL's eagerly, SLEEF's compiled): not compiled."""
    assert not PCM.curves(86400.0, torch.float32, "cpu")["exact"]
    assert _tables(PCM).curves(86400.0, torch.float32, "cpu")["exact"]


def test_exp_is_accurate_and_the_same_compiled():
    """noise_models.exp (the drift factor of the noise pass): within 2 float32 ulps of the
    exact value over [-87, 0], and the same bytes eagerly and under torch.compile."""
    from romer.cim import noise_models

    y = torch.cat([torch.linspace(-87.0, 0.0, 200_001), -torch.rand(100_000) * 5, torch.tensor([0.0, -1e-30])])
    e = noise_models.exp(y)
    ref = torch.exp(y.double())
    ulp = (torch.nextafter(ref.float(), torch.tensor(float("inf"))) - ref.float()).double()
    assert float(((e.double() - ref).abs() / ulp).max()) < 2.0
    assert float(noise_models.exp(torch.tensor([-200.0]))) > 0  # clamped at exp(-87), no subnormal
    try:
        compiled = torch.compile(noise_models.exp, dynamic=True, fullgraph=True)(y)
    except Exception as exc:  # no C++ compiler here
        pytest.skip(f"torch.compile unavailable: {type(exc).__name__}")
    assert torch.equal(compiled, e)
