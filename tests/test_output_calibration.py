"""benchmarks/output_calibration.py (a ROMER+ candidate): its block decomposition is exact, and the
fit lowers its own objective."""

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build

from romer.cim.noise_models import pcm_joshi2020
from romer.core.params import Params
from romer.pipeline.experiment import Experiment
from romer.pipeline.stages import clean_percentiles, clean_router_targets

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import output_calibration as oc  # noqa: E402


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v3"])
def test_decomposition_and_fit(family):
    exp = Experiment(Params(cim={"tile": [16, 16]}), model=build(family), noise_model=pcm_joshi2020())
    windows = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    exp.set_state(None)
    clean_out = oc.clean_block_outputs(exp, windows)
    block = exp.blocks[0]
    logits, Y, s = oc.decompose(exp, block, oc.block_inputs(exp, windows, block.layer, {}))
    # the family's own routing over the per-expert parts gives back the block's output
    got = oc.routed_output(exp.adapter, block.router, logits, Y, s, 1.0, 0.0, 1.0)
    assert torch.allclose(got, clean_out[block.layer], atol=1e-6, rtol=1e-4)
    pct, targets = clean_percentiles(exp, windows), clean_router_targets(exp, windows)
    exp.set_state(3)  # noisy, through the periphery
    plan, report = oc.output_calibrate(exp, windows, clean_out, pct, targets, refit=False, free=("a", "b", "g"),
                                       seed=3)
    assert set(plan) == set(exp.layers)
    for r in report.values():
        assert r["rel_err"]["fitted"] < r["rel_err"]["init"]
    # the local target is the clean block (on the clean model's inputs: its clean output), and the chip is
    # noisy again afterwards
    exp.set_state(None)
    xs = oc.block_inputs(exp, windows, block.layer, {})
    exp.set_state(3)
    noisy_w = block.router.weight.detach().clone()
    assert torch.allclose(oc.clean_block_on(exp, block, xs, 3), clean_out[block.layer], atol=1e-6, rtol=1e-4)
    assert torch.equal(block.router.weight, noisy_w)


def test_kept_families(tmp_path):
    """A run for one family keeps the others of an earlier run on the same validation set, and
    nothing of a run on another set."""
    import json
    path = tmp_path / "oc.json"
    header = {"dataset": "validation", "seeds": [1000, 1001], "max_tokens": 64}
    assert oc.kept_families(str(path), header, ["deepseek_v3"]) == {}
    path.write_text(json.dumps({**header, "families": {"olmoe": {"noisy": 1.0}}, "seconds": 5.0}))
    assert oc.kept_families(str(path), header, ["deepseek_v3"]) == {"olmoe": {"noisy": 1.0, "seconds": 5.0}}
    assert oc.kept_families(str(path), header, ["olmoe"]) == {}
    assert oc.kept_families(str(path), {**header, "max_tokens": 128}, ["deepseek_v3"]) == {}


def test_fit_keeps_the_best_point_when_the_line_search_overflows(monkeypatch):
    """On DeepSeek-V3, L-BFGS once stepped too far for float32 and raised: the fit then keeps the
    best point it evaluated (never worse than the start) and says so."""
    exp = Experiment(Params(cim={"tile": [16, 16]}), model=build("olmoe"), noise_model=pcm_joshi2020())
    windows = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    exp.set_state(None)
    clean_out = oc.clean_block_outputs(exp, windows)
    block = exp.blocks[0]
    exp.set_state(3)
    logits, Y, s = oc.decompose(exp, block, oc.block_inputs(exp, windows, block.layer, {}))
    E = exp.num_experts
    visited = []

    class Overflowing:
        def __init__(self, params, **kwargs):
            self.params = params

        def zero_grad(self):
            for p in self.params:
                p.grad = None

        def step(self, closure):
            for scale in (1e-2, 1e6):  # a small descent step, then a wild one, then the overflow
                v = closure()
                visited.append(float(v))
                with torch.no_grad():
                    for p in self.params:
                        p -= scale * p.grad
            visited.append(float(closure()))
            raise RuntimeError("value cannot be converted to type float without overflow")

    monkeypatch.setattr(torch.optim, "LBFGS", Overflowing)
    got = oc.fit_layer(exp.adapter, block.router, logits, Y, s, clean_out[block.layer], torch.ones(E),
                       torch.zeros(E), free=("a", "b", "g"))
    assert got["lbfgs_error"].startswith("value cannot be converted")
    assert got["rel_err"]["fitted"] <= got["rel_err"]["init"]
    assert got["rel_err"]["fitted"] == pytest.approx(min([got["rel_err"]["init"]] + visited), rel=1e-6)
