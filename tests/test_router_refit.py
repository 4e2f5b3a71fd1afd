"""ROMER+ router refit (romer.methods.router_refit): exact on a clean model, and it undoes router damage."""

import pytest
import torch
from tiny_models import build

from romer.methods.calibration import collect_logits
from romer.methods.router_refit import clean_router_plan, clean_routers, refit_routers, ridge_router
from romer.moe.adapters import get_adapter
from romer.moe.routing import Recorder, routed


def test_ridge_recovers_an_exact_linear_map_and_alpha_pulls_to_the_prior():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=g)
    w_true, b_true = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    w, b = ridge_router(x, x @ w_true.T + b_true, torch.zeros(4, 6), alpha=0.0)
    assert torch.allclose(w.float(), w_true, atol=1e-5) and torch.allclose(b.float(), b_true, atol=1e-5)
    prior = torch.randn(4, 6, generator=g)
    w_inf, _ = ridge_router(x, x @ w_true.T, prior, alpha=1e9)
    assert torch.allclose(w_inf.float(), prior, atol=1e-4)


def _logits_and_indices(model, a, windows, plan=None):
    rec = Recorder(logits=True, indices=True)
    with torch.no_grad(), routed(model, a, plan, rec):
        out = model(windows, use_cache=False).logits
    return out, rec


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v3"])
def test_digital_router_reproduces_the_clean_model_and_refit_undoes_router_damage(family):
    torch.manual_seed(0)
    model = build(family).eval()
    a = get_adapter(model)
    windows = torch.randint(0, model.config.vocab_size, (8, 32))
    clean_out, clean_rec = _logits_and_indices(model, a, windows)
    clean_w = clean_routers(model, a)
    out, _ = _logits_and_indices(model, a, windows, clean_router_plan(clean_w))
    assert torch.allclose(out, clean_out, atol=1e-5)

    clean_logits = collect_logits(model, a, windows, 4, "cpu")
    with torch.no_grad():  # damage every router: a gain error per expert and an offset
        for b in a.blocks(model):
            E = b.router.weight.shape[0]
            b.router.weight.mul_(torch.linspace(0.5, 1.5, E)[:, None]).add_(0.05 * torch.randn_like(b.router.weight))
    damaged, dam_rec = _logits_and_indices(model, a, windows)
    plan = refit_routers(model, a, windows, 4, "cpu", clean_logits, clean_w, alpha=1e-6)
    fixed, fix_rec = _logits_and_indices(model, a, windows, plan)
    # the hidden states are clean here (only the routers were damaged), so the refit is the clean router
    assert (fixed - clean_out).abs().max() < 1e-3 < (damaged - clean_out).abs().max()
    for layer in clean_rec.indices:
        assert torch.equal(fix_rec.cat_indices(layer).sort(-1).values, clean_rec.cat_indices(layer).sort(-1).values)
