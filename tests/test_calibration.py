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


def test_temperature_and_shift_baselines_are_the_map_restricted():
    """temperature: one scale per layer (pooled spans), no shift; shift: per-expert midpoints, no scale."""
    import pytest

    from romer.methods.calibration import FITS, calibrate_maps, shift_map, temperature_map

    noisy = torch.tensor([[0.0, 1.0], [1.0, 4.0]])  # spans 1 and 3
    clean = torch.tensor([[0.0, 4.0], [2.0, 6.0]])  # spans 4 and 4
    a, b = temperature_map(noisy, clean)
    assert a.tolist() == [2.0, 2.0] and b.tolist() == [0.0, 0.0]
    a, b = shift_map(noisy, clean)
    assert a.tolist() == [1.0, 1.0] and b.tolist() == [1.5, 1.5]
    assert temperature_map(torch.zeros(3, 2), clean[:1].expand(3, 2))[0].tolist() == [1.0] * 3
    assert FITS["percentile"] is affine_map
    with pytest.raises(ValueError, match="unknown calibration fit 'typo'"):
        calibrate_maps(None, None, None, 1, "cpu", {0: clean}, (5, 95), fit="typo")
