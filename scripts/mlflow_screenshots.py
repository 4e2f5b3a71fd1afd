"""Screenshots of the MLflow UI (runs table and chart view) in headless Chromium, for docs/mlflow.md.

    python scripts/mlflow_screenshots.py [--tracking-uri sqlite:///mlflow.db] [--out docs/img]

Starts `mlflow server` on the store, finds the `romer` experiment and its latest evaluate parent run,
and writes mlflow_runs.png (its method children, best first, with the method keys as columns) and
mlflow_chart.png (the chart view of the children). Needs Chromium (`apt-get install chromium` on Debian).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from romer.reporting.mlflow_server import mlflow_server
from romer.reporting.summary import METHOD_KEYS

# The runs table's columns: MLflow shows none of the metrics until they are picked under *Columns*, so
# the script stores a shared view (what the UI's *Share* button does: an experiment tag
# `mlflow.sharedViewState.<key>` holding the view as JSON) and opens it with `viewStateShareKey`.
VIEW_TAG = "mlflow.sharedViewState."


def api(url, endpoint, body=None):
    req = urllib.request.Request(url + endpoint, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def shoot(browser, url, path, size="1600,900", wait_ms=25000):
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"wrote {path} ({Path(path).stat().st_size} bytes) from {url}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="romer")
    ap.add_argument("--out", default="docs/img")
    a = ap.parse_args()
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        sys.exit("error: no Chromium found (apt-get install chromium)")
    with mlflow_server(a.tracking_uri) as url:
        exp = api(url, "/api/2.0/mlflow/experiments/get-by-name?" + urllib.parse.urlencode(
            {"experiment_name": a.experiment}))["experiment"]
        eid = exp["experiment_id"]
        parents = api(url, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [eid], "filter": "tags.kind = 'evaluate'", "max_results": 1,
            "order_by": ["attributes.start_time DESC"]}).get("runs", [])
        if not parents:
            sys.exit(f"error: no evaluate run in experiment {a.experiment!r}: run `dvc repro` first")
        parent = parents[0]["info"]["run_id"]
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        # The method children of the latest evaluate, best first: one row (and one bar per chart) per
        # method, with the method keys as columns.
        first = ("ppl_mean", "reduction_pct")
        columns = ["tags.`method`"] + [f"metrics.`{k}`" for k in first + tuple(k for k in METHOD_KEYS if k not in first)]
        search = f"tags.mlflow.parentRunId = '{parent}'"
        view = {"searchFilter": search, "orderByKey": "metrics.`ppl_mean`", "orderByAsc": True,
                "selectedColumns": columns, "columnOrder": columns,
                "runsHiddenMode": "SHOW_ALL", "compareRunsMode": "TABLE"}
        key = hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:32]
        api(url, "/api/2.0/mlflow/experiments/set-experiment-tag",
            {"experiment_id": eid, "key": VIEW_TAG + key, "value": json.dumps(view)})
        base = f"{url}/#/experiments/{eid}/runs?viewStateShareKey={key}"
        shoot(browser, base + "&compareRunsMode=TABLE", out / "mlflow_runs.png", size="1900,800")
        print(f"shared view: {base}")
        shoot(browser, base + "&compareRunsMode=CHART", out / "mlflow_chart.png", size="1600,1100", wait_ms=60000)


if __name__ == "__main__":
    main()
