"""Screenshots of the MLflow UI (runs table and chart view) in headless Chromium, for docs/mlflow.md.

    python scripts/mlflow_screenshots.py [--tracking-uri sqlite:///mlflow.db] [--out docs/img]

Starts `mlflow server` on the store, finds the `romer` experiment and its latest evaluate parent run,
and writes mlflow_runs.png (the parent with its method children) and mlflow_chart.png (the chart
view of the children). Needs Chromium (`apt-get install chromium` on Debian).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", a.tracking_uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    sys.exit("error: mlflow server did not start")
                time.sleep(0.5)
        exp = api(url, "/api/2.0/mlflow/experiments/get-by-name?" + urllib.parse.urlencode(
            {"experiment_name": a.experiment}))["experiment"]
        eid = exp["experiment_id"]
        parents = api(url, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [eid], "filter": "tags.kind = 'evaluate'", "max_results": 1,
            "order_by": ["attributes.start_time DESC"]}).get("runs", [])
        if not parents:
            sys.exit(f"error: no evaluate run in experiment {a.experiment!r}: run `dvc repro` first")
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        # The method children of the latest evaluate: one row (and one bar per chart) per method.
        children = urllib.parse.quote(f"tags.mlflow.parentRunId = '{parents[0]['info']['run_id']}'")
        base = f"{url}/#/experiments/{eid}/runs?searchFilter={children}&orderByKey=metrics.%60ppl_mean%60&orderByAsc=true"
        shoot(browser, base + "&compareRunsMode=TABLE", out / "mlflow_runs.png")
        shoot(browser, base + "&compareRunsMode=CHART", out / "mlflow_chart.png", size="1600,1100", wait_ms=60000)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
