"""Measurement CSV loading and validation (romer.cim.chip_data)."""

from pathlib import Path

import numpy as np
import pytest

from romer.cim.chip_data import MIN_DEVICES_PER_LEVEL, load_measurements
from romer.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CHIP = ROOT / "data" / "chip"


def write_csv(path, header, rows):
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


def good_rows(levels=(5.0, 10.0, 20.0), per=12, seed=0, time=None):
    rng = np.random.default_rng(seed)
    rows = []
    for g in levels:
        for _ in range(per):
            r = [g, round(g + 0.5 * rng.standard_normal(), 4)]
            if time is not None:
                r.append(time)
            rows.append(r)
    return rows


def test_shipped_samples_load():
    m = load_measurements(CHIP / "pcm_sample.csv")
    assert len(m) == 100_000 and m.t_s is not None and m.device is not None and m.read_id is not None
    assert len(m.level_g) >= 8 and not m.binned
    assert sorted(np.unique(m.t_s)) == [20.0, 300.0, 3600.0, 86400.0]
    w = load_measurements(str(CHIP / "reram_wan2022_sample.csv"))
    assert w.read_id is None and len(w.level_g) >= 8
    mi = load_measurements(CHIP / "reram_milo2021_sample.csv")  # continuous targets -> bins
    assert mi.binned and 8 <= len(mi.level_g) <= 32 and mi.device is None


def test_glob_combines_files_and_device_ids_are_file_scoped(tmp_path):
    hdr = ["g_target_uS", "g_measured_uS", "device_id"]
    rows = [[g, g + 0.1 * (i % 3), i + 12 * k] for k, g in enumerate((5.0, 10.0)) for i in range(12)]
    write_csv(tmp_path / "a.csv", hdr, rows)
    write_csv(tmp_path / "b.csv", hdr, rows)
    m = load_measurements([str(tmp_path / "*.csv")])
    assert len(m) == 48 and m.files == [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
    assert len(np.unique(m.device)) == 48  # the same id in two files names two devices
    _, n_dev = m.device_keys()
    assert n_dev == 48


def test_header_case_blanks_bom_comments_extra_columns(tmp_path):
    p = tmp_path / "x.csv"
    body = "\n".join(f"{g},{g + 0.01 * i:.4f},chipA" for g in (5, 10) for i in range(12))
    p.write_text("\ufeff# a comment line\n G_Target_uS , g_measured_uS ,chip\n\n" + body + "\n", encoding="utf-8")
    m = load_measurements(p)
    assert len(m) == 24 and list(m.level_g) == [5.0, 10.0]


@pytest.mark.parametrize("header,rows,needle", [
    (["g_target_uS", "t_s"], [[1, 2]], "missing required column(s) 'g_measured_uS'"),
    (["g_target_uS", "g_measured_uS"], [[1, 1], [2, "abc"]], "line 3 (data row 2), column 'g_measured_uS': 'abc' is not a number"),
    (["g_target_uS", "g_measured_uS"], [[1, 1], ["", 1]], "line 3 (data row 2), column 'g_target_uS': is empty"),
    (["g_target_uS", "g_measured_uS"], [[1, 1], [1, -0.5]], "line 3 (data row 2), column 'g_measured_uS'"),
    (["g_target_uS", "g_measured_uS"], [[-1, 1]], "column 'g_target_uS': conductance -1 is negative"),
    (["g_target_uS", "g_measured_uS"], [[1, "nan"]], "column 'g_measured_uS': value 'nan' is not finite"),
    (["g_target_uS", "g_measured_uS"], [[1, "inf"]], "is not finite"),
    (["g_target_uS", "g_measured_uS", "t_s"], [[1, 1, 0]], "column 't_s': time 0 must be > 0"),
    (["g_target_uS", "g_measured_uS", "device_id"], [[1, 1, ""]], "column 'device_id': is empty"),
    (["g_target_uS", "g_measured_uS"], [[1, 1, 3]], "line 2 (data row 1): expected 2 fields"),
    (["g_target_uS", "g_measured_uS", "g_target_uS"], [[1, 1, 1]], "column 'g_target_uS' appears 2 times"),
    (["g_target_uS", "g_measured_uS"], [], "no data rows"),
])
def test_malformed_rows_name_file_and_place(tmp_path, header, rows, needle):
    p = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(UserError) as e:
        load_measurements(p)
    assert p in str(e.value) and needle in str(e.value), str(e.value)


def test_too_few_devices_per_level(tmp_path):
    rows = good_rows(per=MIN_DEVICES_PER_LEVEL) + good_rows(levels=(30.0,), per=3)
    p = write_csv(tmp_path / "few.csv", ["g_target_uS", "g_measured_uS"], rows)
    with pytest.raises(UserError, match=r"few.csv: column 'g_target_uS': level 30 uS has 3 device\(s\)"):
        load_measurements(p)


def test_devices_counted_not_reads(tmp_path):
    # 3 devices read 10 times each: still 3 devices
    rows = [[5.0, 5.0 + 0.01 * r, d, r] for d in range(3) for r in range(10)]
    p = write_csv(tmp_path / "reads.csv", ["g_target_uS", "g_measured_uS", "device_id", "read_id"], rows)
    with pytest.raises(UserError, match="has 3 device"):
        load_measurements(p)


def test_duplicate_read_and_mismatched_columns(tmp_path):
    rows = [[5.0, 5.0, d, 0] for d in range(12)] + [[5.0, 5.1, 3, 0]]
    p = write_csv(tmp_path / "dup.csv", ["g_target_uS", "g_measured_uS", "device_id", "read_id"], rows)
    with pytest.raises(UserError, match=r"dup.csv, line 14: duplicates the read at .*dup.csv, line 5"):
        load_measurements(p)
    a = write_csv(tmp_path / "a.csv", ["g_target_uS", "g_measured_uS"], good_rows())
    b = write_csv(tmp_path / "b.csv", ["g_target_uS", "g_measured_uS", "t_s"], good_rows(time=1))
    with pytest.raises(UserError, match="b.csv: has optional columns"):
        load_measurements([a, b])


def test_empty_missing_and_unmatched(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="empty.csv: empty file"):
        load_measurements(tmp_path / "empty.csv")
    (tmp_path / "c.csv").write_text("# only a comment\n\n")
    with pytest.raises(UserError, match="c.csv: empty file"):
        load_measurements(tmp_path / "c.csv")
    with pytest.raises(UserError, match="nope.csv: file not found"):
        load_measurements(tmp_path / "nope.csv")
    with pytest.raises(UserError, match=r"\*.tsv: no file matches"):
        load_measurements(str(tmp_path / "*.tsv"))
    with pytest.raises(UserError, match="is a directory"):
        load_measurements(tmp_path)
    (tmp_path / "semi.csv").write_text("g_target_uS;g_measured_uS\n1;1\n")
    with pytest.raises(UserError, match="delimiter must be a comma"):
        load_measurements(tmp_path / "semi.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(UserError, match="not a UTF-8"):
        load_measurements(tmp_path / "bin.csv")


@pytest.mark.parametrize("factor, unit", [(1e-6, "S"), (1e-3, "mS"), (1e3, "nS"), (1e6, "pS")])
def test_values_not_in_microsiemens_are_refused_naming_the_unit(tmp_path, factor, unit):
    rows = [[g * factor, m * factor] for g, m in good_rows()]
    p = write_csv(tmp_path / "unit.csv", ["g_target_uS", "g_measured_uS"], rows)
    with pytest.raises(UserError) as e:
        load_measurements(p)
    msg = str(e.value)
    assert "unit.csv: column 'g_target_uS'" in msg and "do not look like microsiemens" in msg
    assert f"they fit as {unit}" in msg


def test_a_row_in_another_unit_is_named(tmp_path):
    rows = good_rows()
    rows[7][1] = 12.0e3  # one read logged in nS
    p = write_csv(tmp_path / "row.csv", ["g_target_uS", "g_measured_uS"], rows)
    with pytest.raises(UserError, match=r"row.csv: column 'g_measured_uS': 1 read\(s\) above 100x the largest "
                                        r"target \(20 uS\), e.g. line 9 \(1.2e\+04\)"):
        load_measurements(p)


def test_all_zero_targets_are_refused(tmp_path):
    p = write_csv(tmp_path / "z.csv", ["g_target_uS", "g_measured_uS"], [[0, 0.1]] * 20)
    with pytest.raises(UserError, match="every target is 0"):
        load_measurements(p)


def test_levels_are_grouped_relatively_not_by_absolute_rounding(tmp_path):
    # 1e-7 apart is a different level at 0.5 uS (relative 2e-7) though 6-decimal rounding merged them;
    # float text noise (relative 1e-12) is the same level.
    rows = [[g, g] for g in (0.5, 0.5000001, 10.0, 10.0 * (1 + 1e-12)) for _ in range(12)]
    m = load_measurements(write_csv(tmp_path / "lv.csv", ["g_target_uS", "g_measured_uS"], rows))
    assert list(m.level_g) == [0.5, 0.5000001, 10.0]
    assert np.bincount(m.level).tolist() == [12, 12, 24]


def test_streaming_reader_matches_across_chunks(tmp_path, monkeypatch):
    """Chunk boundaries change nothing: the same file read in 7-row chunks gives the same arrays and errors."""
    import romer.cim.chip_data as cd

    ref = load_measurements(CHIP / "pcm_sample.csv")
    monkeypatch.setattr(cd, "CHUNK_ROWS", 7)
    small = load_measurements(CHIP / "pcm_sample.csv")
    for name in ("g_target", "g_measured", "t_s", "device", "read_id", "line", "level"):
        assert np.array_equal(getattr(ref, name), getattr(small, name)), name
    rows = good_rows()
    rows[30][1] = "x"
    with pytest.raises(UserError, match=r"line 32 \(data row 31\), column 'g_measured_uS': 'x' is not a number"):
        load_measurements(write_csv(tmp_path / "c.csv", ["g_target_uS", "g_measured_uS"], rows))
