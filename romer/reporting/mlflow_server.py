"""A local `mlflow server` for the duration of a `with` block (the REST tests, the docs' screenshots).

It runs in its own process group (MLflow 3 forks workers) with one worker and no job runner, and the
whole group is stopped on exit, whatever happened inside the block.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(store_uri: str, artifact_root: str | Path | None = None, log_path: str | Path | None = None,
                  timeout_s: float = 120):
    """Yield the base URL of a server on 127.0.0.1 over `store_uri` once /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if artifact_root is not None:
        cmd += ["--default-artifact-root", str(artifact_root)]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner processes
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    tail = Path(log_path).read_text()[-3000:] if log_path else "(no log kept)"
                    raise RuntimeError(f"mlflow server on {store_uri} did not start:\n{tail}") from None
                time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if log is not subprocess.DEVNULL:
            log.close()
