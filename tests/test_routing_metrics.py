import math

import pytest
import torch

from romer.moe.routing_metrics import expert_load, jaccard_agreement, kl_divergence, load_stats


def test_expert_load_counts_topk_selections():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    load = expert_load(idx, 4)
    assert load.tolist() == pytest.approx([4 / 8, 2 / 8, 1 / 8, 1 / 8])


def test_load_stats_balanced_and_skewed():
    bal = load_stats(torch.full((8,), 1 / 8))
    assert bal["cv"] == pytest.approx(0) and bal["maxvio"] == pytest.approx(0)
    assert bal["entropy"] == pytest.approx(1) and bal["underactivated_frac"] == 0
    load = torch.tensor([0.5, 0.3, 0.15, 0.05])  # mean 0.25
    s = load_stats(load, tau=0.25)  # underactivated: load < 0.0625
    std = math.sqrt(sum((x - 0.25) ** 2 for x in load.tolist()) / 4)
    assert s["cv"] == pytest.approx(std / 0.25)
    assert s["maxvio"] == pytest.approx(0.5 / 0.25 - 1)
    ent = -sum(p * math.log(p) for p in load.tolist()) / math.log(4)
    assert s["entropy"] == pytest.approx(ent)
    assert s["underactivated_frac"] == pytest.approx(0.25)


def test_jaccard_agreement():
    a = torch.tensor([[0, 1], [2, 3], [0, 1]])
    b = torch.tensor([[1, 0], [2, 0], [4, 5]])
    # token 0: identical sets (1); token 1: {2,3} vs {2,0} -> 1/3; token 2: disjoint -> 0
    assert jaccard_agreement(a, b, 6) == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_kl_divergence():
    p = torch.tensor([0.5, 0.5])
    assert kl_divergence(p, p) == pytest.approx(0, abs=1e-9)
    q = torch.tensor([0.9, 0.1])
    expect = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q) == pytest.approx(expect, rel=1e-4)
