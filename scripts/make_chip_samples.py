"""Generate the sample chip-measurement CSVs in data/chip/ from published noise fits.

These are NOT raw chip data: every value is drawn from the published fits cited in
data/chip/README.md, with a fixed seed, so the files are deterministic and the fitting code can be
checked against known curves. Run from the repo root:

    python scripts/make_chip_samples.py [--out data/chip]

pcm_sample.csv            PCM, Nandakumar 2019 / Joshi 2020 (aihwkit PCMLikeNoiseModel):
                          10 levels, 10000 devices, reads at 20 s, 5 min, 1 h and 1 day;
                          4 reads at 20 s and 2 at each later time (100000 rows).
reram_wan2022_sample.csv  ReRAM, Wan 2022 (NeuRRAM, CrossSim RRAM_Wan) at t = 1 s:
                          9 levels, 9000 devices, one read each.
reram_milo2021_sample.csv ReRAM, Milo 2021 (CrossSim): continuous targets (binned by the fit),
                          8000 devices, one read each, only the two required columns.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

# --- published fits (DESIGN.md, "Published fits")
PCM_G_MAX = 25.0
PCM_C = (0.26348, 1.9650, -1.1731)
PCM_T0 = 20.0
PCM_T_READ = 250e-9
WAN_G_MAX = 39.26
WAN_C = (1.053, 0.2374, -1.167e-2, 1.536e-4)  # sigma_G in powers of G (uS)
MILO_G_MAX = 225.0
MILO_C = (4.782321, -0.009107)


def pcm_sigma(g):
    x = g / PCM_G_MAX
    return PCM_C[0] + PCM_C[1] * x + PCM_C[2] * x**2


def pcm_nu(g):
    lx = np.log(np.maximum(g / PCM_G_MAX, 1e-7))
    return np.clip(-0.0155 * lx + 0.0244, 0.049, 0.1), np.clip(-0.0125 * lx - 0.0059, 0.008, 0.045)


def pcm_q(g):
    return np.minimum(0.0088 / np.maximum(g / PCM_G_MAX, 1e-3) ** 0.65, 0.2)


def wan_sigma(g):
    return sum(c * g**k for k, c in enumerate(WAN_C))


def milo_sigma(g):
    return MILO_C[0] + MILO_C[1] * g


def _write(path, header, cols, fmts):
    lines = [",".join(header)]
    lines += [",".join(f % v for f, v in zip(fmts, row)) for row in zip(*cols)]
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"wrote {path}: {len(lines) - 1} rows, {Path(path).stat().st_size / 1e6:.2f} MB")


def make_pcm(path, seed=2020, per_level=1000, reads=(4, 2, 2, 2), times=(20.0, 300.0, 3600.0, 86400.0)):
    rng = np.random.default_rng(seed)
    levels = np.round(np.linspace(0.1, 1.0, 10) * PCM_G_MAX, 4)
    g_t = np.repeat(levels, per_level)
    n = len(g_t)
    g_prog = np.maximum(g_t + pcm_sigma(g_t) * rng.standard_normal(n), 0.0)  # programming noise
    mu, sd = pcm_nu(g_t)
    nu = mu + sd * rng.standard_normal(n)  # drift exponent per device
    q = pcm_q(g_prog)
    cols = {k: [] for k in ("g_t", "g_m", "t", "dev", "read")}
    for t, n_reads in zip(times, reads):
        g_d = g_prog * (t / PCM_T0) ** (-nu) if t > PCM_T0 else g_prog
        s_read = np.abs(g_d) * q * math.sqrt(math.log((t + PCM_T_READ) / (2 * PCM_T_READ)))
        for r in range(n_reads):
            g_m = np.maximum(g_d + s_read * rng.standard_normal(n), 0.0)  # 1/f read noise, one draw per read
            cols["g_t"].append(g_t)
            cols["g_m"].append(g_m)
            cols["t"].append(np.full(n, t))
            cols["dev"].append(np.arange(n))
            cols["read"].append(np.full(n, r))
    c = {k: np.concatenate(v) for k, v in cols.items()}
    order = np.lexsort((c["read"], c["t"], c["dev"]))  # device by device, then time, then read
    _write(path, ["g_target_uS", "g_measured_uS", "t_s", "device_id", "read_id"],
           [np.round(c["g_t"][order], 4), np.round(c["g_m"][order], 4), c["t"][order], c["dev"][order], c["read"][order]],
           ["%g", "%.4f", "%g", "%d", "%d"])


def make_wan(path, seed=2022, per_level=1000):
    rng = np.random.default_rng(seed)
    levels = np.round(np.linspace(0.2, 1.0, 9) * WAN_G_MAX, 4)
    g_t = np.repeat(levels, per_level)
    g_m = np.maximum(g_t + wan_sigma(g_t) * rng.standard_normal(len(g_t)), 0.0)
    _write(path, ["g_target_uS", "g_measured_uS", "t_s", "device_id"],
           [g_t, np.round(g_m, 4), np.ones(len(g_t)), np.arange(len(g_t))], ["%g", "%.4f", "%g", "%d"])


def make_milo(path, seed=2021, n=8000):
    rng = np.random.default_rng(seed)
    g_t = np.round(rng.uniform(0.1, 1.0, n) * MILO_G_MAX, 4)  # continuous targets
    g_m = np.maximum(g_t + milo_sigma(g_t) * rng.standard_normal(n), 0.0)
    _write(path, ["g_target_uS", "g_measured_uS"], [g_t, np.round(g_m, 4)], ["%.4f", "%.4f"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/chip")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    make_pcm(out / "pcm_sample.csv")
    make_wan(out / "reram_wan2022_sample.csv")
    make_milo(out / "reram_milo2021_sample.csv")


if __name__ == "__main__":
    main()
