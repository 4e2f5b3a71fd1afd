"""`romer noise-stats` (romer.cim.stats): the JSON object, the text report, and clean errors."""

import json
import math

import pytest

from romer.cim.noise_models import pcm_joshi2020
from romer.cim.stats import noise_stats
from romer.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def run_json(capsys, *args):
    assert main(["noise-stats", *args, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object on one line
    return json.loads(out)


def test_json_has_the_figures_and_matches_the_library(capsys):
    r = run_json(capsys, "--noise", "pcm-joshi2020")
    assert {"gain", "rel_err_row_std", "alpha", "alpha_range", "weight_rel_err"} <= set(r)
    assert "out_rel_err" not in r and "periphery" not in r
    assert r["t_inference_s"] == 25.0 and r["rows"] == r["cols"] == 512 and r["weight_scaling"] == "row"
    ref = noise_stats(pcm_joshi2020(), 25.0)
    for k in ("gain", "rel_err_row_std", "alpha", "weight_rel_err"):
        assert r[k] == pytest.approx(ref[k], rel=1e-12), k
    assert 0.0350 <= r["rel_err_row_std"] <= 0.0372


def test_json_with_a_periphery_has_the_output_error(capsys):
    r = run_json(capsys, "--noise", "none", "--periphery", "aihwkit-io-default")
    assert abs(r["out_rel_err"] - 0.0442) <= 0.0015
    assert r["weight_scaling"] == "tile"  # the preset's mapping
    assert r["periphery"]["name"] == "aihwkit-io-default"
    r = run_json(capsys, "--noise", "none", "--periphery", "aihwkit-hwa")
    assert "out_rel_err_vs_clipped_input" in r and r["out_rel_err_vs_clipped_input"] < r["out_rel_err"]
    r = run_json(capsys, "--noise", "pcm-joshi2020", "--periphery", "aihwkit-io-default", "--weight-scaling", "row")
    assert r["weight_scaling"] == "row" and r["out_rel_err"] > 0.05  # device noise on top


def test_options_reach_the_simulation(capsys):
    r = run_json(capsys, "--noise", "pcm-joshi2020", "--tile", "128x64", "--rows", "256", "--cols", "384",
                 "--t-inference-s", "86420", "--seed", "3")
    assert r["tile"] == [128, 64] and (r["rows"], r["cols"], r["seed"]) == (256, 384, 3)
    assert r["alpha"] > 1.2 and r["alpha_range"][0] < r["alpha_range"][1]  # one alpha per array
    off = run_json(capsys, "--noise", "pcm-joshi2020", "--t-inference-s", "86420", "--no-drift-compensation")
    assert off["alpha"] == 1.0 and off["drift_compensation"] is False and off["gain"] < 0.8
    quiet = run_json(capsys, "--noise", "pcm-joshi2020", "--prog-scale", "0", "--read-scale", "0",
                     "--drift-scale", "0")
    assert quiet["rel_err_row_std"] < 1e-6 and quiet["scales"] == {"prog": 0.0, "read": 0.0, "drift": 0.0}
    strong = run_json(capsys, "--noise", "pcm-joshi2020", "--prog-scale", "2", "--read-scale", "2")
    assert strong["rel_err_row_std"] > 1.8 * run_json(capsys, "--noise", "pcm-joshi2020")["rel_err_row_std"]


def test_text_report(capsys):
    assert main(["noise-stats", "--noise", "pcm-joshi2020", "--periphery", "aihwkit-hwa", "--rows", "64",
                 "--cols", "64"]) == 0
    out = capsys.readouterr().out
    assert "noise pcm-joshi2020 at t = 25 s" in out and "prog sigma" in out
    assert "rel_err_row_std" in out and "with periphery aihwkit-hwa: output error" in out


@pytest.mark.parametrize("args, needle", [
    (["--periphery", "perfect"], "--periphery: unknown preset 'perfect'"),
    (["--tile", "512"], "--tile: expected ROWSxCOLS"),
    (["--tile", "0x512"], "--tile: expected ROWSxCOLS"),
    (["--tile", "axb"], "--tile: expected ROWSxCOLS"),
    (["--tile", "8x8x8"], "--tile: expected ROWSxCOLS"),
    (["--t-inference-s", "0"], "--t-inference-s must be"),
    (["--t-inference-s", "nan"], "--t-inference-s must be"),
    (["--prog-scale", "-1"], "--prog-scale must be"),
    (["--read-scale", "inf"], "--read-scale must be"),
    (["--rows", "0"], "--rows and --cols must be >= 1"),
    (["--range-crest", "0"], "--range-crest must be"),
])
def test_bad_options_exit_2_with_one_line(capsys, args, needle):
    assert main(["noise-stats", "--noise", "pcm-joshi2020", *args, "--json"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.startswith("error: ") and needle in cap.err, cap.err
    assert cap.err.strip().count("\n") == 0 and "Traceback" not in cap.err


def test_unknown_noise_source_and_bad_choice(capsys):
    assert main(["noise-stats", "--noise", "no/such/file.csv", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --noise: ") and "no/such/file.csv" in err and "params key" not in err
    with pytest.raises(SystemExit) as e:  # argparse: an unknown --weight-scaling choice
        main(["noise-stats", "--noise", "none", "--weight-scaling", "column"])
    assert e.value.code == 2
    assert math.isfinite(run_json(capsys, "--noise", "gaussian:0.05")["gain"])


def test_range_crest_lowers_the_weights_in_the_conductance_range(capsys):
    base = run_json(capsys, "--noise", "pcm-joshi2020", "--t-inference-s", "86420")
    crest = run_json(capsys, "--noise", "pcm-joshi2020", "--t-inference-s", "86420", "--range-crest", "12")
    assert crest["range_crest"] == 12.0 and base["range_crest"] is None
    # full scale at 12 rms instead of ~3 rms: each weight sits ~4x lower, its relative error grows ~2-3x
    assert 2 * base["weight_rel_err"] < crest["weight_rel_err"] < 4 * base["weight_rel_err"]
