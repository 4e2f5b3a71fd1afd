"""Plots of the stage outputs: PNGs (for people) and CSVs (for `dvc plots show`)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from romer.core.io import atomic_path  # noqa: E402

# One colour per method in every plot (the same in eval_ppl, eval_cv_per_layer, sweep and drift).
METHOD_COLORS = {
    "clean": "#2ca02c", "noisy": "#7f7f7f", "romer": "#ff7f0e", "romer_expected": "#ffbb78",
    "calibrate_only": "#1f77b4", "calibrate_only_expected": "#aec7e8", "replace_only": "#9467bd",
    "hetero_digital": "#8c564b", "hetero_digital_romer": "#e377c2", "hetero_digital_12p5pct": "#bcbd22",
    "hetero_digital_25pct": "#17becf", "temperature_only": "#d62728", "hetero_digital_attn_analog": "#c49c94",
    "affine_columns": "#c5b0d5",
    "router_digital": "#393b79", "romer_plus": "#e6550d",
}
_EXTRA = ["#f7b6d2", "#dbdb8d", "#9edae5", "#637939"]
plt.rcParams.update({"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                     "grid.alpha": 0.3, "font.size": 9, "legend.frameon": False})


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _EXTRA[sum(map(ord, method)) % len(_EXTRA)]  # stable across runs (no hash randomisation)


def method_label(method: str) -> str:
    return {"romer": "ROMER", "romer_expected": "ROMER (expected plan)"}.get(method, method.replace("_", " "))


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def _csv(path, header, rows):
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return path


def plot_profile(profile: dict, out_dir):
    """Clean against noisy expert load, one panel per MoE layer, and a layer x expert heat map of the
    routing damage (noisy load / clean load)."""
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
    cols = min(2, len(layers))
    nrows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 2.3 * nrows + 0.6), squeeze=False,
                             constrained_layout=True)
    for ax, layer in zip(axes.flat, layers):
        c = np.asarray(profile["clean"]["layers"][layer]["load"])
        n = np.asarray(profile["noisy_load"][layer])
        x = np.arange(E)
        ax.bar(x - 0.2, c, width=0.4, label="clean", color=method_color("clean"))
        ax.bar(x + 0.2, n, width=0.4, label="noisy", color=method_color("noisy"))
        ax.axhline(profile["tau"] / E, color="k", lw=0.8, ls="--", label="tau / E (underactivated below)")
        ax.set_title(f"layer {layer}")
        ax.set_xlim(-1, E)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("expert")
        ax.set_ylabel("load")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)  # off the data
    fig.suptitle(f"expert load: fraction of top-{profile['top_k']} picks, clean vs noisy chip")
    _save(fig, out_dir / "profile_load.png")

    clean = np.array([profile["clean"]["layers"][l]["load"] for l in layers]) * E  # 1 = uniform
    noisy = np.array([profile["noisy_load"][l] for l in layers]) * E
    ratio = np.log2(np.maximum(noisy, 1e-3) / np.maximum(clean, 1e-3))
    fig, axes = plt.subplots(3, 1, figsize=(min(0.12 * E + 2.5, 11), 3 * (0.3 * len(layers) + 0.8)),
                             constrained_layout=True)
    vmax = max(clean.max(), noisy.max())
    for ax, data, title in ((axes[0], clean, "clean load x E (1 = uniform)"),
                            (axes[1], noisy, "noisy load x E")):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.03)
    lim = max(1.0, float(np.abs(ratio).max()))
    im = axes[2].imshow(ratio, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[2].set_title("routing damage: log2(noisy / clean load); blue: the chip starves the expert")
    fig.colorbar(im, ax=axes[2], fraction=0.03)
    for ax in axes:
        ax.set_yticks(range(len(layers)), [f"layer {l}" for l in layers])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("expert")
        ax.grid(False)
    _save(fig, out_dir / "profile_heatmap.png")


def plot_eval(ev: dict, out_dir) -> list[Path]:
    """PPL per method with 95% CI bars (ROMER and the best method marked), and load CV per layer; returns
    the files written."""
    out_dir = Path(out_dir)
    names = [k for k in ev["ppl"] if k != "clean"]
    means = [ev["ppl"][k]["mean"] for k in names]
    lo = [m - ev["ppl"][k]["ci95"][0] for k, m in zip(names, means)]
    hi = [ev["ppl"][k]["ci95"][1] - m for k, m in zip(names, means)]
    made = [_csv(out_dir / "eval_ppl.csv", ["method", "ppl_mean", "ci95_lo", "ci95_hi"],
         [["clean", round(ev["ppl"]["clean"], 4), "", ""]]
         + [[k, round(ev["ppl"][k]["mean"], 4), round(ev["ppl"][k]["ci95"][0], 4), round(ev["ppl"][k]["ci95"][1], 4)]
            for k in names])]
    noisy = ev["ppl"]["noisy"]["mean"] if "noisy" in ev["ppl"] else None
    repaired = [k for k in names if k != "noisy"]
    best = min(repaired, key=lambda k: ev["ppl"][k]["mean"]) if repaired else None
    fig, ax = plt.subplots(figsize=(7.2, 0.42 * len(names) + 1.4), constrained_layout=True)
    y = np.arange(len(names))[::-1]  # first method on top
    ax.barh(y, means, xerr=[lo, hi], capsize=3, color=[method_color(k) for k in names],
            edgecolor=["black" if k in ("romer", best) else "none" for k in names], linewidth=1.2)
    ax.axvline(ev["ppl"]["clean"], color=method_color("clean"), ls="--", label=f"clean {ev['ppl']['clean']:.2f}")
    for yi, k, m, h in zip(y, names, means, hi):
        tag = f"{m:.2f}"
        if noisy is not None and k != "noisy":
            tag += f"  ({100 * (noisy - m) / noisy:+.1f}% vs noisy)"
        if k == best:
            tag += "  best"
        ax.text(m + h, yi, "  " + tag, va="center", fontsize=7)
    ax.set_yticks(y, [method_label(k) for k in names])
    for t, k in zip(ax.get_yticklabels(), names):
        if k == "romer":
            t.set_fontweight("bold")
    lo_x = min(ev["ppl"]["clean"], min(m - l for m, l in zip(means, lo)))
    hi_x = max(m + h for m, h in zip(means, hi))
    ax.set_xlim(lo_x * 0.95, hi_x + (hi_x - lo_x * 0.95) * 0.45)  # room for the labels
    ax.set_xlabel("perplexity (lower is better); reduction positive = better than noisy")
    ax.set_title(f"{ev['dataset']}, {len(ev['seeds'])} noise seeds, 95% CI")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="lower right", fontsize=7)
    made.append(_save(fig, out_dir / "eval_ppl.png"))

    cv = ev["cv_per_layer"]
    layers = list(cv["clean"])
    made.append(_csv(out_dir / "eval_cv_per_layer.csv", ["layer"] + list(cv), [[l] + [round(cv[m][l], 5) for m in cv] for l in layers]))
    fig, ax = plt.subplots(figsize=(7.5, 3.4), constrained_layout=True)
    styles = ["-", "--", ":", "-."]
    for i, m in enumerate(cv):
        ax.plot([int(l) for l in layers], [cv[m][l] for l in layers], marker="o", ms=4, color=method_color(m),
                ls=styles[i // 6 % len(styles)], lw=2.2 if m == "romer" else 1.3, label=method_label(m))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("CV of expert load (lower: more balanced)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    made.append(_save(fig, out_dir / "eval_cv_per_layer.png"))
    return made


def plot_sweep(sw: dict, out_dir):
    """PPL and load CV against the noise strength: noisy, the temperature baseline (where the sweep has
    it) and ROMER."""
    out_dir = Path(out_dir)
    temp = "temperature_only" in sw
    _csv(out_dir / "sweep.csv", ["scale", "noisy", "romer", "cv_noisy", "cv_romer"] + ["temperature_only"] * temp,
         [[s, round(a, 4), round(b, 4), round(c, 5), round(d, 5)] + [round(sw["temperature_only"][i], 4)] * temp
          for i, (s, a, b, c, d) in enumerate(zip(sw["scale"], sw["noisy"], sw["romer"], sw["cv_noisy"],
                                                  sw["cv_romer"]))])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
    series = [("noisy", "noisy")] + [("temperature_only", "temperature only")] * temp + [("romer", "ROMER")] + [
        ("romer_plus", "ROMER+ (router refit)")] * ("romer_plus" in sw)
    for key, label in series:
        lo = [sw[key][i] - sw[f"{key}_ci95"][i][0] for i in range(len(sw["scale"]))]
        hi = [sw[f"{key}_ci95"][i][1] - sw[key][i] for i in range(len(sw["scale"]))]
        a1.errorbar(sw["scale"], sw[key], yerr=[lo, hi], marker="o", capsize=3, label=label, color=method_color(key))
    a1.axhline(sw["clean"], color=method_color("clean"), ls="--", label="clean")
    a1.set_xlabel("noise strength (x prog and read scales)")
    a1.set_ylabel("perplexity")
    a1.set_yscale("log")
    a1.legend(fontsize=8)
    a2.plot(sw["scale"], sw["cv_noisy"], marker="o", label="noisy", color=method_color("noisy"))
    a2.plot(sw["scale"], sw["cv_romer"], marker="o", label="ROMER", color=method_color("romer"))
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
    ax.plot(dr["t_s"], dr["noisy"], marker="o", label="noisy", color=method_color("noisy"))
    ax.plot(dr["t_s"], dr["romer"], marker="o", label=f"ROMER, calibrated at t0 = {dr['t0_s']:g} s",
            color=method_color("romer"))
    ax.plot(dr["t_s"], dr["romer_recalibrated"], marker="s", ls="--", label="ROMER, re-calibrated at t",
            color=method_color("romer_expected"))
    ax.axhline(dr["clean"], color=method_color("clean"), ls="--", label="clean")
    ax.set_xscale("log")
    ax.set_xlabel("time since programming (s)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=7)
    _save(fig, out_dir / "drift.png")
