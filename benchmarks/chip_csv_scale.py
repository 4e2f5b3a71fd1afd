"""Scale of the measurement-CSV reader (issue 16): time and peak RSS of load_measurements on a large CSV.

    python benchmarks/chip_csv_scale.py [--rows 3000000] [--json]

Writes a synthetic PCM-like CSV (wafer/die/device ids, read_id, t_s, targets, reads at 6 decimals:
~71 bytes a row, as the 213 MB / 3M-row file of issue 16) to a temp dir, loads it in a fresh process
and reports wall time, peak RSS and RSS / file size.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

LOAD = """
import resource, sys, time
from romer.cim.chip_data import load_measurements
from romer.cim.noise_fit import fit_noise
t = time.perf_counter()
m = load_measurements(sys.argv[1])
dt = time.perf_counter() - t
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
fit_noise(m, degree=2)  # the whole of `romer fit-noise` but the JSON write (it imports torch: ~200 MB)
dt_fit = time.perf_counter() - t
print(dt, rss_load, dt_fit, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, len(m), len(m.level_g))
"""


def write_csv(path, rows, seed=0):
    rng = np.random.default_rng(seed)
    levels = np.linspace(0.0, 25.0, 8)
    reads, times = 5, 3
    n_dev = rows // (reads * times)
    with open(path, "w") as f:
        f.write("device_id,read_id,t_s,g_target_uS,g_measured_uS\n")
        # e.g. "lot0042_wafer03_die017_dev00012345,2,86400.000,12.500000,12.3456789"
        for start in range(0, n_dev, 20000):
            dev = np.arange(start, min(n_dev, start + 20000))
            tgt = levels[dev % len(levels)]
            g0 = np.maximum(tgt + rng.normal(0, 1.0, len(dev)), 0)
            block = []
            for t in (25.0, 3600.0, 86400.0):
                drift = (t / 25.0) ** -0.05
                for r in range(reads):
                    g = np.maximum(g0 * drift + rng.normal(0, 0.3, len(dev)), 0)
                    block.append((dev, r, t, tgt, g))
            lines = []
            for d, r, t, tg, g in block:
                lines.extend(f"lot0042_wafer{a % 7:02d}_die{a % 113:03d}_dev{a:08d},{r},{t:.3f},{b:.6f},{c:.7f}\n"
                             for a, b, c in zip(d, tg, g))
            f.writelines(lines)
    return n_dev * reads * times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "big.csv")
        n = write_csv(path, a.rows)
        size = os.path.getsize(path)
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run([sys.executable, "-c", LOAD, path], capture_output=True, text=True, env=env, check=True)
        dt, rss, dt_fit, rss_fit, n_rows, n_levels = out.stdout.split()
    res = {"rows": int(n_rows), "file_mb": round(size / 1e6, 1), "levels": int(n_levels),
           "load_s": round(float(dt), 2), "load_peak_rss_mb": round(int(rss) / 1e6, 1),
           "load_rss_over_file": round(int(rss) / size, 2),
           "load_and_fit_s": round(float(dt_fit), 2), "load_and_fit_peak_rss_mb": round(int(rss_fit) / 1e6, 1),
           "load_and_fit_rss_over_file": round(int(rss_fit) / size, 2)}
    print(json.dumps(res) if a.json else "\n".join(f"{k}: {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
