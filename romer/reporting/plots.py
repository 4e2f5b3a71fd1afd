"""Plots of the stage outputs: PNGs (for people) and CSVs (for `dvc plots show`)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from romer.core.io import atomic_path  # noqa: E402


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png", metadata={"Software": None})
    plt.close(fig)


def _csv(path, header, rows):
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)


def plot_profile(profile: dict, out_dir):
    """Clean against noisy expert load, one panel per MoE layer."""
    out_dir = Path(out_dir)
    layers = list(profile["clean"]["layers"])
    E = profile["num_experts"]
    rows = []
    for layer in layers:
        c = profile["clean"]["layers"][layer]["load"]
        n = profile["noisy_load"][layer]
        rows += [[int(layer) * E + e, int(layer), e, round(c[e], 6), round(n[e], 6)] for e in range(E)]
    # slot = layer x E + expert: an x that does not repeat across layers (dvc plots draws one line)
    _csv(out_dir / "profile_load.csv", ["slot", "layer", "expert", "clean", "noisy"], rows)
    cols = min(4, len(layers))
    nrows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        c = profile["clean"]["layers"][layer]["load"]
        n = profile["noisy_load"][layer]
        x = range(E)
        ax.bar([i - 0.2 for i in x], c, width=0.4, label="clean")
        ax.bar([i + 0.2 for i in x], n, width=0.4, label="noisy")
        ax.axhline(profile["tau"] / E, color="k", lw=0.8, ls="--")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"expert load (fraction of top-{profile['top_k']} picks); dashed: tau/E", fontsize=10)
    _save(fig, out_dir / "profile_load.png")


def plot_eval(ev: dict, out_dir):
    """PPL per method with 95% CI bars, and load CV per layer per method."""
    out_dir = Path(out_dir)
    names = [k for k in ev["ppl"] if k != "clean"]
    means = [ev["ppl"][k]["mean"] for k in names]
    lo = [m - ev["ppl"][k]["ci95"][0] for k, m in zip(names, means)]
    hi = [ev["ppl"][k]["ci95"][1] - m for k, m in zip(names, means)]
    _csv(out_dir / "eval_ppl.csv", ["method", "ppl_mean", "ci95_lo", "ci95_hi"],
         [["clean", round(ev["ppl"]["clean"], 4), "", ""]]
         + [[k, round(ev["ppl"][k]["mean"], 4), round(ev["ppl"][k]["ci95"][0], 4), round(ev["ppl"][k]["ci95"][1], 4)]
            for k in names])
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.2))
    ax.bar(names, means, yerr=[lo, hi], capsize=4, color="tab:orange")
    ax.axhline(ev["ppl"]["clean"], color="tab:green", ls="--", label=f"clean {ev['ppl']['clean']:.1f}")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{ev['dataset']}, {len(ev['seeds'])} noise seeds, 95% CI", fontsize=10)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    _save(fig, out_dir / "eval_ppl.png")

    cv = ev["cv_per_layer"]
    layers = list(cv["clean"])
    _csv(out_dir / "eval_cv_per_layer.csv", ["layer"] + list(cv), [[l] + [round(cv[m][l], 5) for m in cv] for l in layers])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for m in cv:
        ax.plot([int(l) for l in layers], [cv[m][l] for l in layers], marker="o", label=m)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("CV of expert load")
    ax.legend(fontsize=7)
    _save(fig, out_dir / "eval_cv_per_layer.png")


def plot_sweep(sw: dict, out_dir):
    """PPL and load CV against the noise strength, noisy vs ROMER."""
    out_dir = Path(out_dir)
    _csv(out_dir / "sweep.csv", ["scale", "noisy", "romer", "cv_noisy", "cv_romer"],
         [[s, round(a, 4), round(b, 4), round(c, 5), round(d, 5)]
          for s, a, b, c, d in zip(sw["scale"], sw["noisy"], sw["romer"], sw["cv_noisy"], sw["cv_romer"])])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
    for key, label in (("noisy", "noisy"), ("romer", "ROMER")):
        lo = [sw[key][i] - sw[f"{key}_ci95"][i][0] for i in range(len(sw["scale"]))]
        hi = [sw[f"{key}_ci95"][i][1] - sw[key][i] for i in range(len(sw["scale"]))]
        a1.errorbar(sw["scale"], sw[key], yerr=[lo, hi], marker="o", capsize=3, label=label)
    a1.axhline(sw["clean"], color="tab:green", ls="--", label="clean")
    a1.set_xlabel("noise strength (x prog and read scales)")
    a1.set_ylabel("perplexity")
    a1.set_yscale("log")
    a1.legend(fontsize=8)
    a2.plot(sw["scale"], sw["cv_noisy"], marker="o", label="noisy")
    a2.plot(sw["scale"], sw["cv_romer"], marker="o", label="ROMER")
    a2.set_xlabel("noise strength (x prog and read scales)")
    a2.set_ylabel("CV of expert load (layer mean)")
    a2.legend(fontsize=8)
    fig.suptitle(f"noise-strength sweep, {len(sw['seeds'])} seeds, 95% CI", fontsize=10)
    _save(fig, out_dir / "sweep.png")


def plot_drift(dr: dict, out_dir):
    """PPL against time since programming: noisy, ROMER calibrated at t0, ROMER re-calibrated."""
    out_dir = Path(out_dir)
    _csv(out_dir / "drift.csv", ["t_s", "noisy", "romer", "romer_recalibrated"],
         [[t, round(a, 4), round(b, 4), round(c, 4)]
          for t, a, b, c in zip(dr["t_s"], dr["noisy"], dr["romer"], dr["romer_recalibrated"])])
    fig, ax = plt.subplots(figsize=(5, 3.3))
    ax.plot(dr["t_s"], dr["noisy"], marker="o", label="noisy")
    ax.plot(dr["t_s"], dr["romer"], marker="o", label=f"ROMER, calibrated at t0 = {dr['t0_s']:g} s")
    ax.plot(dr["t_s"], dr["romer_recalibrated"], marker="o", label="ROMER, re-calibrated at t")
    ax.axhline(dr["clean"], color="tab:green", ls="--", label="clean")
    ax.set_xscale("log")
    ax.set_xlabel("time since programming (s)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=7)
    _save(fig, out_dir / "drift.png")
