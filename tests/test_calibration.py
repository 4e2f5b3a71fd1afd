import torch

from romer.methods.calibration import affine_map, make_transform, percentiles


def test_mapping_sends_noisy_percentiles_onto_clean():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(5000, 6, generator=g) * torch.linspace(0.5, 2, 6) + torch.linspace(-1, 1, 6)
    noisy = clean * 1.7 - 0.4 + 0.3 * torch.randn(5000, 6, generator=g)
    for lo, hi in [(5, 95), (25, 75), (1, 99)]:
        pc, pn = percentiles(clean, lo, hi), percentiles(noisy, lo, hi)
        a, b = affine_map(pn, pc)
        mapped = make_transform(a, b)(noisy.double())
        assert torch.allclose(percentiles(mapped, lo, hi), pc, atol=1e-9)


def test_degenerate_spread_shifts_only():
    noisy = torch.tensor([[1.0, 1.0], [2.0, 3.0]])
    clean = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    a, b = affine_map(noisy, clean)
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [-1.0, -4.0]
