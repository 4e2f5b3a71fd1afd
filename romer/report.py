"""Markdown tables generated from the committed metrics (README results, metrics/report.md)."""

from __future__ import annotations

import re
from pathlib import Path

from .io import read_json, write_text

LABELS = {
    "noisy": "noisy (no repair)",
    "replace_only": "replace only",
    "calibrate_only": "calibrate only",
    "romer": "ROMER (replace + calibrate)",
}


def _fmt_ci(s):
    return f"{s['mean']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]"


def eval_table(ev: dict) -> str:
    """Method table: PPL mean and 95% CI, change against noisy, load CV, routing agreement."""
    lb = ev["load_balance"]
    noisy = ev["ppl"]["noisy"]["mean"]
    lines = [
        "| method | PPL (mean [95% CI]) | vs noisy | load CV | MaxVio | routing agreement |",
        "|---|---|---|---|---|---|",
        f"| clean | {ev['ppl']['clean']:.2f} | | {lb['clean']['cv']:.3f} | {lb['clean']['maxvio']:.3f} | 1.000 |",
    ]
    for name, s in ev["ppl"].items():
        if name == "clean":
            continue
        d = lb.get(name, {})
        change = "" if name == "noisy" else f"{100 * (s['mean'] - noisy) / noisy:+.1f}%"
        lines.append(
            f"| {LABELS.get(name, name.replace('_', ' '))} | {_fmt_ci(s)} | {change} | {d.get('cv', float('nan')):.3f} "
            f"| {d.get('maxvio', float('nan')):.3f} | {d.get('routing_agreement', float('nan')):.3f} |"
        )
    lo, hi = ev["ppl_reduction_ci95"]
    n = ev["noise"]
    lines.append("")
    lines.append(
        f"ROMER lowers the noisy perplexity by **{ev['ppl_reduction_pct']:.1f}%** (95% CI of the paired per-seed "
        f"reduction: {lo:.1f}% to {hi:.1f}%), on `{ev['dataset']}` ({ev['tokens']:,} tokens, {len(ev['seeds'])} noise "
        f"seeds), noise `{n['source']}` x{n['scale']:g} at t = {n['t_inference_s']:g} s, analog: "
        f"{', '.join(n['analog'])}. Method: {ev['method']['strategy']}, tau {ev['method']['tau']:g} "
        f"({ev['method']['replaced_experts']} experts replaced), percentiles {ev['method']['percentiles']}, "
        f"{ev['method']['mode']} calibration."
    )
    if ev.get("tasks"):
        lines += ["", "| zero-shot task | clean | noisy | ROMER |", "|---|---|---|---|"]
        for task, t in ev["tasks"].items():
            lines.append(f"| {task} ({t.get('metric', 'acc')}) | {t['clean']:.3f} | {_fmt_ci(t['noisy'])} | "
                         f"{_fmt_ci(t['romer'])} |")
    return "\n".join(lines)


def update_readme(readme="README.md", eval_json="metrics/eval.json", marker="results"):
    """Replace the block between <!-- results:start --> and <!-- results:end --> with the table."""
    text = Path(readme).read_text()
    table = eval_table(read_json(eval_json))
    pat = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pat.search(text):
        raise ValueError(f"{readme} has no <!-- {marker}:start --> ... <!-- {marker}:end --> block")
    write_text(readme, pat.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text))
