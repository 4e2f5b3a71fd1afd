"""Every params.yaml rule stops a stage before any work, naming the key and what was expected."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from romer.core.errors import UserError
from romer.core.params import load_params

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, over):
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, v in over.items():
        *head, last = dotted.split(".")
        d = base
        for k in head:
            d = d.setdefault(k, {})
        if v is DELETE:
            d.pop(last, None)
        else:
            d[last] = v
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


DELETE = object()


def test_committed_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.model.source == "builtin" and p.model.trust_remote_code is False
    assert len(p.eval.seeds) >= 5


@pytest.mark.parametrize("over, needle", [
    ({"noise.scle": 1.0}, "unknown key 'noise.scle'"),
    ({"evaluate": {"seeds": [0]}}, "unknown key 'evaluate'"),
    ({"noise.prog_scale": "big"}, "key 'noise.prog_scale'"),
    ({"noise.prog_scale": -1}, "key 'noise.prog_scale'"),
    ({"noise.read_scale": -0.5}, "key 'noise.read_scale'"),
    ({"noise.read_scale": float("nan")}, "key 'noise.read_scale'"),
    ({"noise.drift_scale": float("inf")}, "key 'noise.drift_scale'"),
    ({"noise.drift_scale": -1}, "key 'noise.drift_scale'"),
    ({"noise.t_inference_s": 0}, "key 'noise.t_inference_s'"),
    ({"noise.t_inference_s": float("inf")}, "key 'noise.t_inference_s'"),
    ({"noise.scale": 10.0}, "unknown key 'noise.scale'"),  # the old single scale is gone
    ({"replace.tau": -0.1}, "key 'replace.tau'"),
    ({"replace.strategy": "clone"}, "key 'replace.strategy'"),
    ({"calibrate.percentiles": [95, 5]}, "lo < hi"),
    ({"calibrate.percentiles": [0, 95]}, "(0, 100)"),
    ({"calibrate.percentiles": [5, 100]}, "(0, 100)"),
    ({"calibrate.percentiles": [5]}, "key 'calibrate.percentiles'"),
    ({"calibrate.mode": "global"}, "key 'calibrate.mode'"),
    ({"eval.seeds": []}, "key 'eval.seeds'"),
    ({"calib.seeds": []}, "key 'calib.seeds'"),
    ({"cim.analog": ["experts"]}, "unknown analog kind"),
    ({"cim.analog": ["router", "router"]}, "must not repeat"),
    ({"cim.levels": 1}, "key 'cim.levels'"),
    ({"cim.tile_rows": 64}, "unknown key 'cim.tile_rows'"),  # now cim.tile: [rows, cols]
    ({"cim.tile": [0, 512]}, "key 'cim.tile'"),
    ({"cim.tile": [512]}, "key 'cim.tile'"),
    ({"cim.tile": [512, 512, 512]}, "key 'cim.tile'"),
    ({"cim.tile": 512}, "key 'cim.tile'"),
    ({"cim.weight_scaling": "column"}, "key 'cim.weight_scaling'"),
    ({"cim.range_crest": 0}, "key 'cim.range_crest'"),
    ({"cim.range_crest": float("inf")}, "key 'cim.range_crest'"),
    ({"cim.periphery.preset": "perfect"}, "key 'cim.periphery.preset'"),
    ({"cim.periphery.inp_res": 1.0}, "key 'cim.periphery.inp_res'"),
    ({"cim.periphery.out_res": -0.1}, "key 'cim.periphery.out_res'"),
    ({"cim.periphery.inp_bound": 0}, "key 'cim.periphery.inp_bound'"),
    ({"cim.periphery.out_noise": float("nan")}, "key 'cim.periphery.out_noise'"),
    ({"cim.periphery.noise_management": "max"}, "key 'cim.periphery.noise_management'"),
    ({"cim.periphery.bound_management": "always"}, "key 'cim.periphery.bound_management'"),
    ({"cim.periphery.adc_bits": 8}, "unknown key 'cim.periphery.adc_bits'"),
    ({"cim.variation.stuck_frac": 1.5}, "key 'cim.variation.stuck_frac'"),
    ({"cim.variation.sigma_spread": -0.1}, "key 'cim.variation.sigma_spread'"),
    ({"cim.variation.gain_std": float("inf")}, "key 'cim.variation.gain_std'"),
    ({"cim.variation.spread": 0.1}, "unknown key 'cim.variation.spread'"),
    ({"beyond.drift_scale": 3}, "unknown key 'beyond.drift_scale'"),  # the drift run uses noise.drift_scale
    ({"beyond.scales": [1, 0]}, "key 'beyond.scales'"),
    ({"model.trust_remote_code": "maybe"}, "key 'model.trust_remote_code'"),
    ({"model.dtype": "int8"}, "key 'model.dtype'"),
    ({"eval.seq_len": 2}, "key 'eval.seq_len'"),
    ({"builtin.top_k": 99}, "top_k"),
    ({"calib.seeds": [100, 101, 100]}, "key 'calib.seeds': seeds must not repeat (repeated: [100])"),
    ({"eval.seeds": [0, 1, 1]}, "key 'eval.seeds': seeds must not repeat"),
    ({"eval.hetero_fractions": [0.25, float("nan")]}, "key 'eval.hetero_fractions.1'"),
    ({"beyond.drift_times_s": [3600, float("inf")]}, "key 'beyond.drift_times_s.1'"),
    ({"calibrate.percentiles": [5, float("nan")]}, "key 'calibrate.percentiles"),
    ({"builtin.lr": float("inf")}, "key 'builtin.lr'"),
    ({"model.allow_missing_weights": "sometimes"}, "key 'model.allow_missing_weights'"),
    ({"calib.allow_overlap": "yes please"}, "key 'calib.allow_overlap'"),
])
def test_rule_names_the_key(tmp_path, over, needle):
    with pytest.raises(UserError) as e:
        load_params(write(tmp_path, over))
    assert needle in str(e.value)
    assert "params.yaml" in str(e.value)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(UserError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("noise: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_params(bad)


def test_duplicate_key_is_named_with_its_lines(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("noise:\n  degree: 2\n  prog_scale: 1.0\n  degree: 3\n")
    with pytest.raises(UserError) as e:
        load_params(p)
    assert "key 'noise.degree' is given twice (lines 2 and 4)" in str(e.value)
    p.write_text("model:\n  source: builtin\nmodel:\n  dtype: float32\n")
    with pytest.raises(UserError, match="key 'model' is given twice"):
        load_params(p)


def test_empty_file_is_refused_and_partial_file_says_what_it_filled(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    for text in ("", "# only a comment\n"):
        p.write_text(text)
        with pytest.raises(UserError, match="is empty"):
            load_params(p)
    p.write_text("noise:\n  degree: 1\n")
    params = load_params(p)
    assert params.noise.degree == 1 and params.eval.seeds == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "has no section(s) model, builtin, cim," in err and "using their defaults" in err
    assert len(err.strip().splitlines()) == 1


def test_family_override_that_is_not_finite_is_refused(tmp_path):
    params = load_params(write(tmp_path, {"beyond.families": {"bad": {"lr": float("inf")}}}))
    with pytest.raises(UserError, match="beyond.families.bad"):
        params.family_builtin("bad")


def run_stage(tmp_path, stage):
    env = dict(os.environ, PYTHONPATH=str(REPO))  # `stages` is a package of the repo root
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("over, needle", [
    ({"noise.scael": 2}, "unknown key 'noise.scael'"),
    ({"noise.prog_scale": -3}, "key 'noise.prog_scale'"),
    ({"noise.source": "data/chip/missing.csv"}, "data/chip/missing.csv"),
])
def test_fit_noise_stage_stops_cleanly(tmp_path, over, needle):
    write(tmp_path, over)
    r = run_stage(tmp_path, "fit_noise")
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "noise").exists() and not (tmp_path / "metrics").exists()


def test_every_stage_validates_params_first(tmp_path):
    write(tmp_path, {"calibrate.percentiles": [50, 40]})
    for stage in ("fetch_model", "fit_noise", "profile", "replace", "percentiles", "evaluate"):
        r = run_stage(tmp_path, stage)
        assert r.returncode == 2, (stage, r.stderr[-500:])
        assert "lo < hi" in r.stderr and "Traceback" not in r.stderr, stage


def test_noise_and_cim_params_defaults_overrides_and_label():
    import json

    from romer.cim.mapping import ArrayVariation
    from romer.cim.periphery import PRESETS, periphery_config
    from romer.core.params import Params
    from romer.pipeline.experiment import noise_label, with_strength

    p = Params()
    n = p.noise
    assert (n.prog_scale, n.read_scale, n.drift_scale, n.t_inference_s) == (1.0, 1.0, 1.0, 86400.0)
    assert p.cim.tile == [512, 512] and p.cim.weight_scaling is None
    assert p.cim.periphery.preset == "aihwkit-io-default" and p.cim.periphery.overrides() == {}
    assert not ArrayVariation(**p.cim.variation.model_dump()).active  # variation off by default
    assert p.beyond.scales == [0.5, 1, 2, 3, 4, 6]

    q = Params.model_validate({"cim": {"tile": None, "weight_scaling": "row", "range_crest": None, "periphery": {
        "preset": "aihwkit-hwa", "out_noise": 0.0, "out_bound": 8, "bound_management": "iterative"}}})
    assert q.cim.tile is None and q.cim.weight_scaling == "row" and q.cim.range_crest is None
    assert q.cim.periphery.overrides() == {"out_noise": 0.0, "out_bound": 8.0, "bound_management": "iterative"}
    cfg = periphery_config(q.cim.periphery.preset, **q.cim.periphery.overrides())
    assert (cfg.out_noise, cfg.out_bound, cfg.bound_management) == (0.0, 8.0, "iterative")
    assert cfg.w_noise == PRESETS["aihwkit-hwa"].w_noise and cfg.name == "aihwkit-hwa+custom"
    assert periphery_config("aihwkit-hwa") is PRESETS["aihwkit-hwa"]
    with pytest.raises(ValueError, match="unknown periphery preset"):
        periphery_config("perfect")

    lab = noise_label(p, 2.0)
    assert set(lab) == {"source", "prog_scale", "read_scale", "drift_scale", "strength", "t_inference_s",
                        "drift_compensation", "analog", "tile", "weight_scaling", "range_crest", "periphery",
                        "variation"}
    assert lab["range_crest"] == p.cim.range_crest
    assert (lab["prog_scale"], lab["read_scale"], lab["drift_scale"], lab["strength"]) == (2.0, 2.0, 1.0, 2.0)
    assert lab["periphery"]["preset"] == "aihwkit-io-default" and lab["tile"] == [512, 512]
    assert json.loads(json.dumps(lab)) == lab  # eval.json material
    assert noise_label(p) != noise_label(q)  # a cim change is a different label (architectures' check)
    s = with_strength(p, 3.0)
    assert (s.noise.prog_scale, s.noise.read_scale, s.noise.drift_scale) == (3.0, 3.0, 1.0)
    assert p.noise.prog_scale == 1.0  # the original is not modified


def test_device_map_and_family_params(tmp_path):
    from romer.core.params import Params

    assert Params.model_validate({"model": {"device_map": "auto"}}).model.device_map == "auto"
    with pytest.raises(Exception, match="device_map"):
        Params.model_validate({"model": {"device_map": "everywhere"}})
    p = Params.model_validate({"beyond": {"families": {"ds": {"family": "deepseek_v3", "shared_experts": 1,
                                                              "n_group": 4, "topk_group": 2}}}})
    assert p.family_builtin("ds").n_group == 4
    with pytest.raises(UserError, match="beyond.families.ds"):
        Params.model_validate({"beyond": {"families": {"ds": {"family": "deepseek_v3"}}}}).family_builtin("ds")
    with pytest.raises(Exception, match="unknown builtin key"):
        Params.model_validate({"beyond": {"families": {"q": {"familly": "qwen2_moe"}}}})
    with pytest.raises(UserError, match="has no family 'nope'"):
        p.family_builtin("nope")


def _keys(d, pre=""):
    out = set()
    for k, v in d.items():
        out.add(pre + k)
        if isinstance(v, dict):
            out |= _keys(v, f"{pre}{k}.")
    return out


def test_params_yaml_spells_out_every_schema_key_with_its_default():
    """Nothing runs on a code default that params.yaml does not show, and the two never disagree."""
    from romer.core.params import Params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    schema = Params().model_dump(mode="json")
    assert _keys(raw) == _keys(schema), {"only in params.yaml": sorted(_keys(raw) - _keys(schema)),
                                         "only in the schema": sorted(_keys(schema) - _keys(raw))}
    committed = load_params(REPO / "params.yaml").model_dump(mode="json")
    diff = {k: (committed[s][k], schema[s][k]) for s in schema for k in schema[s] if committed[s][k] != schema[s][k]}
    assert not diff, f"params.yaml value vs schema default: {diff}"
