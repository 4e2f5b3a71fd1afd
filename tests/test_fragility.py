"""Fragility statistics (romer.moe.fragility) on hand-made inputs with known answers."""

import pytest
import torch

from romer.moe.fragility import excess_kurtosis, margin_stats, row_crest, weight_fragility
from romer.moe.routing_metrics import topk_changed_frac


def test_excess_kurtosis_known_distributions():
    g = torch.Generator().manual_seed(0)
    assert excess_kurtosis(torch.randn(400_000, generator=g)) == pytest.approx(0.0, abs=0.05)
    assert excess_kurtosis(torch.rand(400_000, generator=g)) == pytest.approx(-1.2, abs=0.02)  # uniform
    lap = torch.distributions.Laplace(0.0, 1.0).sample((400_000,))
    assert excess_kurtosis(lap) == pytest.approx(3.0, abs=0.3)


def test_row_crest_is_absmax_over_rms_per_row():
    w = torch.tensor([[[1.0, -1.0, 1.0, -1.0], [4.0, 0.0, 0.0, 0.0]]])  # [1, out 2, in 4]
    assert row_crest(w).tolist() == pytest.approx([1.0, 2.0])


def test_margin_between_kth_and_next_logit():
    logits = torch.tensor([[4.0, 3.0, 2.5, 0.0], [1.0, 1.0, 1.0, 1.01]])
    m = margin_stats(logits, k=2)  # gaps 0.5 and 0.0 (a tie between the 2nd and 3rd largest)
    assert m["margin_median"] == pytest.approx(0.0, abs=1e-6)  # torch's median of two: the lower one
    assert margin_stats(logits[:1], k=2)["margin_median"] == pytest.approx(0.5)
    assert margin_stats(logits[:1], k=1)["margin_median"] == pytest.approx(1.0)
    assert m["near_tie_frac"] == pytest.approx(0.5)  # the second token's gap is < 0.05 of its std


def test_topk_changed_frac_ignores_order():
    a = torch.tensor([[0, 1], [2, 3], [4, 5]])
    b = torch.tensor([[1, 0], [2, 4], [4, 5]])
    assert topk_changed_frac(a, b) == pytest.approx(1 / 3)


def test_weight_fragility_per_moe_layer():
    from tiny_models import build

    from romer.moe.adapters import get_adapter

    model = build("deepseek_v2")
    a = get_adapter(model)
    st = weight_fragility(model, a)
    assert sorted(st) == [b.layer for b in a.blocks(model)]  # MoE layers only (layer 0 is dense)
    for d in st.values():
        assert d["experts"]["row_crest_median"] >= 1 and d["experts"]["row_crest_max"] >= d["experts"]["row_crest_median"]
