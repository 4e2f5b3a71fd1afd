"""Stage fetch_model: make models/model, the model every later stage loads.

model.source == "builtin": train the embedded OLMoE-architecture model on the bundled corpus
(romer.builtin.train) and write its training report to metrics/builtin_train.json and its loss curve
to metrics/plots/builtin_train_loss.csv. Otherwise: fetch the hub model or copy the local one
(romer.moe.models.fetch_external).
"""

from __future__ import annotations

import csv
import io

from romer.core.io import write_json, write_text
from romer.core.paths import MODEL_DIR

METRICS = "metrics/builtin_train.json"
CURVE = "metrics/plots/builtin_train_loss.csv"


def write_curve(path, history):
    cols = ["step", "lr", "train_loss", "balance_loss", "z_loss", "grad_norm", "val_loss"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for rec in history:
        w.writerow(["" if rec.get(c) is None else (f"{rec[c]:.6g}" if isinstance(rec[c], float) else rec[c])
                    for c in cols])
    write_text(path, buf.getvalue())


def run_fetch_model(params, out_dir=MODEL_DIR):
    if params.model.source != "builtin":
        from romer.moe.models import fetch_external

        fetch_external(params.model, out_dir)
        return
    from romer.builtin.train import train_builtin, tune_malloc

    tune_malloc()
    report = train_builtin(params.builtin, out_dir)
    write_curve(CURVE, report.pop("history"))
    # Wall times go to the log (and docs/builtin_model.md), not to the DVC metrics, which must be
    # identical across reruns of the same params.
    times = {k: report.pop(k) for k in [k for k in report if k.endswith("_time_s")]}
    write_json(METRICS, report)
    report.update(times)
    s = report["summary"]
    print(f"builtin model: {report['params']:,} parameters, trained in {report['train_time_s']:.0f} s "
          f"(stage {report['total_time_s']:.0f} s); val ppl {report['val_ppl']:.2f}, "
          f"test ppl {report['test_ppl']:.2f}; load CV max {s['max_cv']:.3f}, "
          f"underactivated max {s['max_underactivated_frac']:.3f}")
