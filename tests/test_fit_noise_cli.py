"""`romer fit-noise`, `romer presets` and the fit_noise stage: outputs on good input, clean refusal on bad."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from romer.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHIP = ROOT / "data" / "chip"


def small_csv(path, levels=(5.0, 10.0, 15.0, 20.0), per=20, t=True, seed=0):
    rng = np.random.default_rng(seed)
    lines = ["g_target_uS,g_measured_uS" + (",t_s,device_id" if t else "")]
    d = 0
    for g in levels:
        for _ in range(per):
            g0 = g + 0.3 * rng.standard_normal()
            for ts in ((1.0, 100.0) if t else (None,)):
                gm = g0 * (ts ** -0.05 if ts else 1.0)
                lines.append(f"{g},{gm:.4f}" + (f",{ts:g},{d}" if t else ""))
            d += 1
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


def test_fit_noise_cli_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "o" / "fit.json", tmp_path / "o" / "fit.png"
    csv = small_csv(tmp_path / "a.csv")
    small_csv(tmp_path / "b.csv", seed=1)
    assert main(["fit-noise", str(tmp_path / "*.csv"), "-o", str(out), "--degree", "1", "--plot", str(png)]) == 0
    fit = json.loads(out.read_text())
    assert fit["files"] == [csv, str(tmp_path / "b.csv")] and fit["fit"]["degree"] == 1
    assert set(fit["programming_sigma_uS"]) == {"g_uS", "sigma_uS"} and fit["g_max_uS"] == 20.0
    assert abs(np.mean(fit["drift_nu"]["mean"]) - 0.05) < 0.005 and fit["read_noise"] is None
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "R²" in capsys.readouterr().out
    assert not list(out.parent.glob(".*tmp"))  # no temp leftovers


def test_fit_noise_cli_on_shipped_sample(tmp_path):
    out = tmp_path / "wan.json"
    assert main(["fit-noise", str(CHIP / "reram_wan2022_sample.csv"), "-o", str(out), "--degree", "3"]) == 0
    assert json.loads(out.read_text())["fit"]["r2"] > 0.9


def _bad(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


GOOD = "".join(f"{g},{g + 0.01 * i:.4f}\n" for g in (5, 10, 15) for i in range(12))
CASES = {
    "missing_column": ("g_target_uS,t_s\n1,2\n", "missing required column(s) 'g_measured_uS'"),
    "non_numeric": ("g_target_uS,g_measured_uS\n" + GOOD + "5,abc\n", "line 38 (data row 37), column 'g_measured_uS': 'abc'"),
    "negative": ("g_target_uS,g_measured_uS\n" + GOOD + "5,-0.2\n", "line 38 (data row 37), column 'g_measured_uS'"),
    "nan": ("g_target_uS,g_measured_uS\n" + GOOD + "nan,5\n", "line 38 (data row 37), column 'g_target_uS': value 'nan' is not finite"),
    "too_few_devices": ("g_target_uS,g_measured_uS\n" + GOOD + "30,30.1\n30,29.9\n", "level 30 uS has 2 device(s)"),
    "empty": ("", "empty file"),
    "header_only": ("g_target_uS,g_measured_uS\n", "no data rows"),
    "ragged": ("g_target_uS,g_measured_uS\n" + GOOD + "5,5,5\n", "line 38 (data row 37): expected 2 fields"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_noise_cli_refuses_bad_csv(tmp_path, capsys, case):
    text, needle = CASES[case]
    csv = _bad(tmp_path, f"{case}.csv", text)
    out, png = tmp_path / "out" / "fit.json", tmp_path / "out" / "fit.png"
    assert main(["fit-noise", csv, "-o", str(out), "--plot", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and csv in err and needle in err, err
    assert not out.exists() and not png.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_fit_noise_cli_missing_file_and_bad_degree(tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert main(["fit-noise", str(tmp_path / "nope.csv"), "-o", str(out)]) == 2
    assert "nope.csv: file not found" in capsys.readouterr().err
    csv = _bad(tmp_path, "ok.csv", "g_target_uS,g_measured_uS\n" + GOOD)
    assert main(["fit-noise", csv, "-o", str(out), "--degree", "5"]) == 2
    assert "needs at least 12 (2 levels per coefficient)" in capsys.readouterr().err
    assert main(["fit-noise", csv, "-o", csv]) == 2  # would overwrite its input
    assert not out.exists() and Path(csv).read_text().startswith("g_target_uS")


def test_presets_cli(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    for name in ("pcm-joshi2020", "reram-wan2022", "reram-milo2021", "gaussian"):
        assert name in text
    assert main(["presets", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["pcm-joshi2020"]["g_max_uS"] == 25.0 and "Joshi" in d["pcm-joshi2020"]["citation"]


def _stage(monkeypatch):
    spec = importlib.util.spec_from_file_location("fit_noise_stage", ROOT / "stages" / "fit_noise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("source", ["csv", "pcm-joshi2020"])
def test_fit_noise_stage(tmp_path, monkeypatch, source):
    src = small_csv(tmp_path / "chip.csv") if source == "csv" else source
    (tmp_path / "params.yaml").write_text(f"noise:\n  source: {src}\n  degree: 1\n")
    monkeypatch.chdir(tmp_path)
    _stage(monkeypatch).main()
    full = json.loads((tmp_path / "noise" / "noise_model.json").read_text())
    summary = json.loads((tmp_path / "metrics" / "noise_fit.json").read_text())
    assert (tmp_path / "metrics" / "plots" / "noise_fit.png").read_bytes()[:4] == b"\x89PNG"
    assert full["source"] == src and summary["source"] == src
    assert summary["kind"] == ("fitted" if source == "csv" else "preset")
    if source == "csv":
        assert summary["r2"] is not None and summary["drift"]["method"] == "per_device"
    else:
        assert summary["drift"]["t0_s"] == 20.0 and summary["read_noise"] is not None


def test_fit_noise_stage_missing_source(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("noise:\n  source: data/chip/none.csv\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        _stage(monkeypatch).main()
    assert e.value.code == 2
    assert "params key 'noise.source'" in capsys.readouterr().err
    assert not (tmp_path / "noise").exists() and not (tmp_path / "metrics").exists()


def test_fit_noise_is_byte_identical_across_runs(tmp_path):
    from pathlib import Path

    from romer.cli import main

    csv = Path(__file__).resolve().parent.parent / "data/chip/reram_wan2022_sample.csv"
    outs = []
    for i in range(2):
        out = tmp_path / f"fit{i}.json"
        assert main(["fit-noise", str(csv), "-o", str(out), "--degree", "3"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_fit_noise_cli_never_deletes_or_half_writes(tmp_path, capsys, monkeypatch):
    import romer.core.io as io

    (tmp_path / "data").mkdir()
    csv = small_csv(tmp_path / "data" / "chip.csv")
    # -o naming an existing directory (here the one holding the input) is refused; nothing deleted
    assert main(["fit-noise", csv, "-o", str(tmp_path / "data"), "--degree", "1"]) == 2
    assert "is an existing directory (expected a file path); nothing was deleted" in capsys.readouterr().err
    assert Path(csv).is_file()
    # an output under a regular file: one line, before any work
    assert main(["fit-noise", csv, "-o", csv + "/fit.json", "--degree", "1"]) == 2
    assert f"{csv} is a file, not a directory" in capsys.readouterr().err
    # the JSON write fails after the plot is made: the plot that existed before is kept as it was
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    png.write_bytes(b"my old plot")
    out.write_text("my old fit")

    def full_disk(path, obj):
        with io.atomic_path(path) as tmp:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "write_json", full_disk)
    assert main(["fit-noise", csv, "-o", str(out), "--degree", "1", "--plot", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: cannot write {out}: No space left on device"
    assert png.read_bytes() == b"my old plot" and out.read_text() == "my old fit"
    assert not list(tmp_path.glob(".*tmp"))  # no temp leftovers
    monkeypatch.undo()
    assert main(["fit-noise", csv, "-o", str(out), "--degree", "1", "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and json.loads(out.read_text())["fit"]["degree"] == 1
