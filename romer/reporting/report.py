"""Markdown tables generated from the committed metrics (README results, metrics/report.md and
metrics/report_beyond.md)."""

from __future__ import annotations

import re
from pathlib import Path

from romer.core.io import read_json, write_text

LABELS = {
    "noisy": "noisy (no repair)",
    "replace_only": "replace only",
    "calibrate_only": "calibrate only",
    "temperature_only": "temperature only (one scale per layer)",
    "affine_columns": "affine columns (per-column digital calibration)",
    "romer": "ROMER (replace + calibrate)",
    "router_digital": "routers digital (clean matrices)",
    "romer_plus": "ROMER+ (routers digital, refitted per chip)",
    "hetero_digital": "hetero digital (matched budget, attention digital)",
    "hetero_digital_attn_analog": "hetero digital (matched budget, attention analog)",
}



def noise_text(n: dict) -> str:
    """One phrase for eval.json's `noise`: source, scales, read time, periphery, crest."""
    per = (n.get("periphery") or {}).get("preset", "?")
    crest = n.get("range_crest")
    return (f"noise `{n.get('source', '?')}` at prog/read/drift scales {n.get('prog_scale', float('nan')):g}/"
            f"{n.get('read_scale', float('nan')):g}/{n.get('drift_scale', float('nan')):g}, t = "
            f"{n.get('t_inference_s', float('nan')):g} s, periphery `{per}`, range_crest "
            f"{'none' if crest is None else format(crest, 'g')}")

def _fmt_ci(s):
    return f"{s['mean']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"


def eval_table(ev: dict) -> str:
    """Method table: PPL mean and 95% CI, PPL reduction against noisy (positive = better, as
    ppl_reduction_pct and MLflow's reduction_pct), load CV, routing agreement."""
    lb = ev["load_balance"]
    noisy = ev["ppl"]["noisy"]["mean"]
    lines = [
        "| method | PPL (mean [95% CI]) | PPL reduction vs noisy | ROMER vs it, paired [95% CI] | load CV | MaxVio "
        "| routing agreement |",
        "|---|---|---|---|---|---|---|",
        f"| clean | {ev['ppl']['clean']:.2f} | | | {lb['clean']['cv']:.3f} | {lb['clean']['maxvio']:.3f} | 1.000 |",
    ]
    for name, s in ev["ppl"].items():
        if name == "clean":
            continue
        d = lb.get(name, {})
        change = "" if name == "noisy" else f"{100 * (noisy - s['mean']) / noisy:+.1f}%"
        vs = (ev.get("romer_vs") or {}).get(name)
        if name == "noisy":
            vs = {"pct": ev["ppl_reduction_pct"], "ci95": ev["ppl_reduction_ci95"]}
        vs = "" if vs is None else f"{vs['pct']:+.1f}% [{vs['ci95'][0]:+.1f}, {vs['ci95'][1]:+.1f}]"
        lines.append(
            f"| {LABELS.get(name, name.replace('_', ' '))} | {_fmt_ci(s)} | {change} | {vs} | {d.get('cv', float('nan')):.3f} "
            f"| {d.get('maxvio', float('nan')):.3f} | {d.get('routing_agreement', float('nan')):.3f} |"
        )
    lo, hi = ev["ppl_reduction_ci95"]
    n = ev["noise"]
    lines.append("")
    lines.append(
        f"ROMER lowers the noisy perplexity by **{ev['ppl_reduction_pct']:.1f}%** (95% CI of the paired per-seed "
        f"reduction: {lo:.1f}% to {hi:.1f}%), on `{ev['dataset']}` ({ev['tokens']:,} tokens, {len(ev['seeds'])} noise "
        f"seeds), {noise_text(n)}, analog: "
        f"{', '.join(n['analog'])}. Method: {ev['method']['strategy']}, tau {ev['method']['tau']:g} "
        f"({ev['method']['replaced_experts_per_chip']:g} experts replaced per chip), percentiles "
        f"{ev['method']['percentiles']}, "
        f"{ev['method']['mode']} calibration."
    )
    if ev.get("tasks"):
        lines += ["", "| zero-shot task | clean | noisy | ROMER |", "|---|---|---|---|"]
        for task, t in ev["tasks"].items():
            lines.append(f"| {task} ({t.get('metric', 'acc')}) | {t['clean']:.3f} | {_fmt_ci(t['noisy'])} | "
                         f"{_fmt_ci(t['romer'])} |")
    return "\n".join(lines)


FAMILY_LABELS = {"olmoe": "OLMoE", "qwen2_moe": "Qwen2-MoE", "deepseek_moe": "DeepSeek-MoE",
                 "deepseek_v3": "DeepSeek-V3"}


def architectures_table(ar: dict) -> str:
    """Across-families table from metrics/architectures.json."""
    lines = ["| family (builtin size) | router | shared experts | clean PPL | noisy PPL | ROMER PPL | "
             "ROMER PPL reduction vs noisy [95% CI] | load CV clean / noisy / ROMER |",
             "|---|---|---|---|---|---|---|---|"]
    for fam, r in ar.items():
        lo, hi = r["reduction_ci95"]
        shape = f" ({r['num_experts']} experts, top-{r['top_k']})" if r.get("num_experts") else ""
        lines.append(f"| {FAMILY_LABELS.get(fam, fam)}{shape} | {r['router']} | {r['shared_experts']} | {r['clean']:.2f} | "
                     f"{r['noisy']:.2f} | {r['romer']:.2f} | {r['reduction_pct']:+.1f}% [{lo:+.1f}, {hi:+.1f}] | "
                     f"{r['cv_clean']:.3f} / {r['cv_noisy']:.3f} / {r['cv_romer']:.3f} |")
    return "\n".join(lines)


def fragility_table(fr: dict) -> str:
    """Per-layer fragility table from metrics/fragility.json (romer.moe.fragility)."""
    lines = ["| family | layer | expert weight kurtosis | expert row abs-max/rms (median / max) | "
             "attention kurtosis | router margin k/k+1 (median, / logit std) | near ties (< 0.05 std) | "
             "top-k set changed by noise |",
             "|---|---|---|---|---|---|---|---|"]
    for fam, r in fr.items():
        if not isinstance(r, dict) or "layers" not in r:
            continue
        label = f"{FAMILY_LABELS.get(fam, fam)} ({r['num_experts']} experts, top-{r['top_k']})"
        for d in r["layers"]:
            lines.append(f"| {label} | {d['layer']} | {d['experts_kurtosis']:.2f} | "
                         f"{d['experts_row_crest_median']:.2f} / {d['experts_row_crest_max']:.2f} | "
                         f"{d.get('attention_kurtosis', float('nan')):.2f} | {d['margin_median']:.3f}, "
                         f"{d['margin_rel_median']:.3f} | {d['near_tie_frac']:.3f} | {d['topk_changed_frac']:.3f} |")
            label = ""
    return "\n".join(lines)


ROUTERS = {"olmoe": "softmax top-k", "qwen2_moe": "softmax top-k", "deepseek_moe": "softmax top-k (greedy)",
           "deepseek_v3": "sigmoid + bias, group-limited top-k"}


def testbed_table(reports: dict) -> str:
    """The embedded models' shape, size, quality and balance, from their training reports
    (`builtin_report.json` of models/model and models/families/*)."""
    lines = ["| model | experts, top-k | shared experts | dense first layers | router | parameters (active) | "
             "val / test PPL | load CV per MoE layer | coldest expert, x fair share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in reports.items():
        c = r["config"]
        fam = c.get("family", "olmoe")
        layers = r["per_layer"]
        coldest = min(min(d["load"]) * len(d["load"]) for d in layers)
        router = ROUTERS.get(fam, fam)
        if fam == "deepseek_v3":
            router += f" ({c.get('n_group')} groups, {c.get('topk_group')} kept)"
        lines.append(f"| {name} ({FAMILY_LABELS.get(fam, fam)}-like) | {c['num_experts']}, top-{c['top_k']} | "
                     f"{c.get('shared_experts', 0)} | {c.get('first_dense_layers', 0)} | {router} | "
                     f"{r['params'] / 1e6:.2f} M ({r['active_params'] / 1e6:.2f} M) | {r['val_ppl']:.2f} / "
                     f"{r['test_ppl']:.2f} | {' / '.join(format(d['cv'], '.2f') for d in layers)} | "
                     f"{coldest:.2f} |")
    return "\n".join(lines)


def update_testbed_doc(doc="docs/testbed.md", model_dir="models/model", families_dir="models/families",
                       fragility_json="metrics/fragility.json"):
    """Refresh the generated blocks of docs/testbed.md: the models (from their training reports,
    present after `make repro` and `make beyond`) and the fragility table. A model whose report is
    absent keeps its row (after `make repro` alone only the default model is on disk); a missing
    fragility file leaves its block as it is. Returns the blocks refreshed."""
    text = Path(doc).read_text()
    done = []
    reports = {}
    if _exists(f"{model_dir}/builtin_report.json"):
        reports["default"] = read_json(f"{model_dir}/builtin_report.json")
    fams = Path(families_dir)
    for d in sorted(fams.iterdir()) if fams.is_dir() else []:
        if (d / "builtin_report.json").is_file():
            reports[d.name] = read_json(d / "builtin_report.json")
    if reports:
        table = testbed_table(reports).splitlines()
        head, fresh = table[:2], table[2:]
        names = {_row_name(r) for r in fresh}
        rows = fresh + [r for r in _block_rows(text, "testbed-families") if _row_name(r) not in names]
        rows.sort(key=lambda r: (_row_name(r) != "default", _row_name(r)))
        text = _replace_block(text, "testbed-families", "\n".join(head + rows), doc)
        done.append("testbed-families")
    if _exists(fragility_json):
        text = _replace_block(text, "fragility", fragility_table(read_json(fragility_json)), doc)
        done.append("fragility")
    write_text(doc, text)
    return done


def _row_name(row: str) -> str:
    """The model name of a testbed table row: `| deepseek_v3 (DeepSeek-V3-like) | ...` -> deepseek_v3."""
    return row.strip("| ").split(" ", 1)[0]


def _block_rows(text, marker) -> list[str]:
    """The data rows (after the header and the rule) of a generated table block; [] when absent."""
    m = re.search(rf"<!-- {marker}:start -->\n(.*?)<!-- {marker}:end -->", text, re.S)
    rows = [r for r in (m.group(1).splitlines() if m else []) if r.startswith("|")]
    return rows[2:]


def _replace_block(text, marker, table, readme):
    pat = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pat.search(text):
        raise ValueError(f"{readme} has no <!-- {marker}:start --> ... <!-- {marker}:end --> block")
    return pat.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)


def update_readme(readme="README.md", eval_json="metrics/eval.json", arch_json="metrics/architectures.json"):
    """Replace the <!-- results:start/end --> block with the method table, and the
    <!-- architectures:start/end --> block with the across-families table when that file exists."""
    text = Path(readme).read_text()
    text = _replace_block(text, "results", eval_table(read_json(eval_json)), readme)
    if _exists(arch_json):
        text = _replace_block(text, "architectures", architectures_table(read_json(arch_json)), readme)
    write_text(readme, text)


def _exists(p):
    return Path(p).is_file()


REPORT_MD = "metrics/report.md"  # the main pipeline's page (evaluate): noise, routing damage, methods
BEYOND_REPORT_MD = "metrics/report_beyond.md"  # beyond/dvc.yaml's page: the same and the studies


def write_report(path=BEYOND_REPORT_MD, beyond=True) -> str:
    """One page from the metrics, its plots embedded (relative links: they show on GitHub and in the MLflow
    run, which carries metrics/plots next to it): noise fit, routing damage, methods, and with
    beyond=True the sweep, drift, families and fragility."""
    by = "the evaluate stage (`dvc repro`)" if not beyond else "`python -m stages.beyond_report` (`make beyond`)"
    md = ["# ROMER report", "", f"Generated by {by} from the files in `metrics/`. PPL reduction is "
          "(noisy - method) / noisy: positive is better.", ""]
    if _exists("metrics/noise_fit.json"):
        nf = read_json("metrics/noise_fit.json")
        md += ["## Noise model", "", f"Source `{nf.get('source', '?')}`. ![noise fit](plots/noise_fit.png)", ""]
    if _exists("metrics/profile.json"):
        pr = read_json("metrics/profile.json")
        md += ["## Routing damage (calibration data, per layer)", "",
               "| layer | clean CV | noisy CV | noisy underactivated | routing agreement | KL(clean‖noisy) |",
               "|---|---|---|---|---|---|"]
        seeds = list(pr["noisy"])
        for layer, c in pr["clean"]["layers"].items():
            n = [pr["noisy"][s]["layers"][layer] for s in seeds]
            avg = lambda k: sum(x[k] for x in n) / len(n)  # noqa: E731
            md.append(f"| {layer} | {c['cv']:.3f} | {avg('cv'):.3f} | {avg('underactivated_frac'):.3f} | "
                      f"{avg('routing_agreement'):.3f} | {avg('kl_clean_noisy'):.3f} |")
        md += ["", "![load per expert](plots/profile_load.png)", "",
               "![routing damage per layer and expert](plots/profile_heatmap.png)", ""]
    if _exists("metrics/eval.json"):
        md += ["## Methods (test split)", "", eval_table(read_json("metrics/eval.json")), "",
               "![ppl](plots/eval_ppl.png) ![cv](plots/eval_cv_per_layer.png)", ""]
    if not beyond:
        write_text(path, "\n".join(md) + "\n")
        return path
    if _exists("metrics/sweep.json"):
        sw = read_json("metrics/sweep.json")
        md += ["## Noise-strength sweep", "", "(strength: a multiplier of noise.prog_scale and noise.read_scale)", "",
               "| strength | noisy PPL | temperature only PPL | ROMER PPL | PPL reduction by ROMER [95% CI] | "
               "ROMER vs temperature only, paired [95% CI] | ROMER+ PPL (reduction [95% CI]) | CV noisy | CV ROMER |",
               "|---|---|---|---|---|---|---|---|---|"]
        for i, s in enumerate(sw["scale"]):
            lo, hi = sw["reduction_ci95"][i]
            temp, vs = "-", "-"
            if "temperature_only" in sw:
                temp = f"{sw['temperature_only'][i]:.2f}"
                vlo, vhi = sw["romer_vs_temperature_ci95"][i]
                vs = f"{sw['romer_vs_temperature_pct'][i]:+.1f}% [{vlo:.1f}, {vhi:.1f}]"
            plus = "-"
            if "romer_plus" in sw:
                plo, phi = sw["romer_plus_reduction_ci95"][i]
                plus = f"{sw['romer_plus'][i]:.2f} ({sw['romer_plus_reduction_pct'][i]:+.1f}% [{plo:.1f}, {phi:.1f}])"
            md.append(f"| {s:g} | {sw['noisy'][i]:.2f} | {temp} | {sw['romer'][i]:.2f} | {sw['reduction_pct'][i]:+.1f}% "
                      f"[{lo:.1f}, {hi:.1f}] | {vs} | {plus} | {sw['cv_noisy'][i]:.3f} | {sw['cv_romer'][i]:.3f} |")
        md += ["", "![sweep](plots/sweep.png)", ""]
    if _exists("metrics/drift.json"):
        dr = read_json("metrics/drift.json")
        n = dr.get("noise", {})
        md += ["## Drift over deployment time", "",
               f"{noise_text(n).capitalize() if n else 'Noise ?'}, global drift compensation "
               f"{'on' if n.get('drift_compensation') else 'off'}; ROMER's plan and maps made at t0 = "
               f"{dr.get('t0_s', float('nan')):g} s (clean PPL {dr['clean']:.2f}).", "",
               "| t | noisy PPL | ROMER (calibrated at t0) | ROMER (re-calibrated) |",
               "|---|---|---|---|"]
        for i, t in enumerate(dr["t_s"]):
            md.append(f"| {_human_time(t)} | {dr['noisy'][i]:.2f} | {dr['romer'][i]:.2f} | {dr['romer_recalibrated'][i]:.2f} |")
        md += ["", "![drift](plots/drift.png)", ""]
    if _exists("metrics/architectures.json"):
        ar = read_json("metrics/architectures.json")
        md += ["## Across MoE families", "", architectures_table(ar), ""]
        worse = [FAMILY_LABELS.get(f, f) for f, r in ar.items() if r["romer"] > r["noisy"]]
        if worse:
            md += [f"ROMER is worse than no repair on {', '.join(worse)}: see docs/ablation.md, section 4 "
                   "(where the calibration gain comes from).", ""]
    if _exists("metrics/fragility.json"):
        md += ["## What makes routing fragile (per MoE layer, clean model; noise: the default)", "",
               fragility_table(read_json("metrics/fragility.json")), "",
               "Published figures for real models, and how far this testbed is from them: docs/testbed.md.", ""]
    write_text(path, "\n".join(md) + "\n")
    return path


def _human_time(t):
    for unit, s in (("year", 31536000), ("month", 2592000), ("day", 86400), ("hour", 3600)):
        if t >= s:
            return f"{t / s:g} {unit}"
    return f"{t:g} s"
