"""Generated documentation blocks: docs/testbed.md's tables from training reports and fragility metrics."""

import json

import pytest

from romer.reporting.report import update_testbed_doc


def _report(family, E, k, loads):
    return {"params": 4_000_000, "active_params": 1_500_000, "val_ppl": 60.0, "test_ppl": 59.5,
            "config": {"family": family, "num_experts": E, "top_k": k, "shared_experts": 1, "first_dense_layers": 0,
                       "n_group": 8, "topk_group": 4},
            "per_layer": [{"layer": i, "cv": 0.1 * (i + 1), "load": l} for i, l in enumerate(loads)]}


def test_testbed_doc_blocks_are_filled_from_the_reports(tmp_path):
    doc = tmp_path / "testbed.md"
    doc.write_text("intro\n<!-- testbed-families:start -->\nold\n<!-- testbed-families:end -->\n"
                   "<!-- fragility:start -->\n<!-- fragility:end -->\nend\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "builtin_report.json").write_text(json.dumps(_report("olmoe", 4, 2, [[0.1, 0.2, 0.3, 0.4]])))
    fam = tmp_path / "families" / "deepseek_v3"
    fam.mkdir(parents=True)
    (fam / "builtin_report.json").write_text(json.dumps(_report("deepseek_v3", 2, 1, [[0.5, 0.5], [0.25, 0.75]])))
    done = update_testbed_doc(doc, tmp_path / "model", tmp_path / "families", tmp_path / "none.json")
    text = doc.read_text()
    assert done == ["testbed-families"]
    assert "\nold\n" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "| default (OLMoE-like) | 4, top-2 | 1 | 0 | softmax top-k |" in text
    assert "| 0.10 | 0.40 |" in text  # one MoE layer's CV; coldest expert 0.1 x 4 = 0.4 of fair
    assert "(8 groups, 4 kept)" in text and "| 0.10 / 0.20 | 0.50 |" in text


def test_testbed_doc_without_its_markers_is_an_error(tmp_path):
    doc = tmp_path / "testbed.md"
    doc.write_text("no markers\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "builtin_report.json").write_text(json.dumps(_report("olmoe", 4, 2, [[0.25] * 4])))
    with pytest.raises(ValueError, match="testbed-families:start"):
        update_testbed_doc(doc, tmp_path / "model", tmp_path / "families", tmp_path / "none.json")
    assert doc.read_text() == "no markers\n"


def test_testbed_doc_keeps_the_rows_of_models_not_on_disk(tmp_path):
    """After `make repro` alone only the default model exists: the family rows of `make beyond` stay."""
    doc = tmp_path / "testbed.md"
    doc.write_text("<!-- testbed-families:start -->\n| model | x |\n|---|---|\n| default (OLMoE-like) | stale |\n"
                   "| qwen2_moe (Qwen2-MoE-like) | kept |\n| deepseek_moe (DeepSeek-MoE-like) | kept too |\n"
                   "<!-- testbed-families:end -->\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "builtin_report.json").write_text(json.dumps(_report("olmoe", 4, 2, [[0.25] * 4])))
    update_testbed_doc(doc, tmp_path / "model", tmp_path / "families", tmp_path / "none.json")
    rows = [r for r in doc.read_text().splitlines() if r.startswith("| ") and "-like)" in r]
    assert [r.split(" ")[1] for r in rows] == ["default", "deepseek_moe", "qwen2_moe"]
    assert "stale" not in doc.read_text() and "| kept |" in rows[2] and "| kept too |" in rows[1]
