"""Stage fetch_model: make models/model, the model every later stage loads.

model.source == "builtin": train the embedded OLMoE-architecture model on the bundled corpus
(romer.builtin) and write its training report to metrics/builtin_train.json and its loss curve to
metrics/plots/builtin_train_loss.csv. Otherwise: fetch the hub model or copy the local one
(romer.models.fetch_external).
"""

import csv
import io
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: an idle OpenMP thread spins 1000 times (libgomp's own value for an
# oversubscribed CPU), not 300000, before it sleeps. On an idle CPU that costs nothing; on a CPU
# shared with another busy process it made a training step 2x faster (measured, see
# docs/builtin_model.md). Set GOMP_SPINCOUNT yourself to override.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# Repo root instead of stages/ on the path: stages/profile.py would shadow the stdlib `profile`.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from romer.errors import exit_on_user_error  # noqa: E402
from romer.io import write_json, write_text  # noqa: E402
from romer.params import load_params  # noqa: E402

OUT = "models/model"
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


@exit_on_user_error
def main():
    params = load_params()
    if params.model.source == "builtin":
        from romer.builtin import train_builtin, tune_malloc

        tune_malloc()
        report = train_builtin(params.builtin, OUT)
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
    else:
        from romer.models import fetch_external

        fetch_external(params.model, OUT)


if __name__ == "__main__":
    main()
