"""One row per method of an eval.json-shaped result, and the headline of a run.

Both MLflow (one child run per method, romer.reporting.tracking) and `metrics/summary.json` (what
`dvc metrics show` prints) read these, so the two never disagree. Sign convention throughout:
`reduction_pct` = (noisy - method) / noisy x 100, positive means better than the unrepaired chip.
"""

from __future__ import annotations

SUMMARY_JSON = "metrics/summary.json"  # written by evaluate next to eval.json (dvc.yaml names it)
METHOD_KEYS = ("ppl_mean", "ppl_ci_lo", "ppl_ci_hi", "reduction_pct", "load_cv", "maxvio", "routing_agreement")


def _ppl(v):
    """(mean, lo, hi, per_seed) of a ppl entry: a float (the deterministic clean model) or mean/ci95/per_seed."""
    if isinstance(v, (int, float)):
        return float(v), float(v), float(v), None
    lo, hi = v.get("ci95", [v["mean"], v["mean"]])
    return float(v["mean"]), float(lo), float(hi), v.get("per_seed")


def method_rows(ev: dict) -> list[dict]:
    """Per method in ev['ppl'] order: the METHOD_KEYS (None where the result has no such number), the task
    accuracies as `task.<name>`, and `per_seed` / `per_layer` lists for step-wise logging."""
    ppl = ev.get("ppl") or {}
    noisy = _ppl(ppl["noisy"])[0] if "noisy" in ppl else None
    lb = ev.get("load_balance") or {}
    cv_layers = ev.get("cv_per_layer") or {}
    rows = []
    for method, v in ppl.items():
        mean, lo, hi, per_seed = _ppl(v)
        bal = lb.get(method) or {}
        row = {"method": method, "ppl_mean": mean, "ppl_ci_lo": lo, "ppl_ci_hi": hi,
               "reduction_pct": None if noisy is None else 100.0 * (noisy - mean) / noisy,
               "load_cv": bal.get("cv"), "maxvio": bal.get("maxvio"),
               "routing_agreement": bal.get("routing_agreement")}
        for task, t in (ev.get("tasks") or {}).items():
            if method in t:
                row[f"task.{task}"] = _ppl(t[method])[0]
        row["per_seed"] = list(zip(ev.get("seeds") or range(len(per_seed)), per_seed)) if per_seed else []
        layers = cv_layers.get(method) or {}
        row["per_layer"] = sorted((int(k), float(x)) for k, x in layers.items())
        rows.append(row)
    return rows


def headline(ev: dict) -> dict:
    """The few numbers a reader wants first (metrics/summary.json and the MLflow parent run)."""
    rows = {r["method"]: r for r in method_rows(ev)}
    out = {"tokens": ev.get("tokens"), "seeds": len(ev.get("seeds") or [])}
    for m in ("clean", "noisy", "romer", "romer_plus"):
        if m in rows:
            out[f"ppl_{m}"] = round(rows[m]["ppl_mean"], 4)
    if "ppl_reduction_pct" in ev:
        out["romer_reduction_pct"] = round(ev["ppl_reduction_pct"], 3)
        lo, hi = ev.get("ppl_reduction_ci95", [None, None])
        out["romer_reduction_ci_lo"], out["romer_reduction_ci_hi"] = (
            None if lo is None else round(lo, 3), None if hi is None else round(hi, 3))
    if "romer_plus" in rows and rows["romer_plus"]["reduction_pct"] is not None:
        out["romer_plus_reduction_pct"] = round(rows["romer_plus"]["reduction_pct"], 3)
    for m in ("noisy", "romer"):
        if m in rows and rows[m]["load_cv"] is not None:
            out[f"load_cv_{m}"] = round(rows[m]["load_cv"], 4)
    repaired = [r for r in rows.values() if r["method"] not in ("clean", "noisy")]
    if repaired:
        best = min(repaired, key=lambda r: r["ppl_mean"])
        out["best_method"] = best["method"]
        out["best_reduction_pct"] = round(best["reduction_pct"], 3) if best["reduction_pct"] is not None else None
    return out
