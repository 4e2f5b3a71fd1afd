"""Numerical modes pinned so that a run gives the same bytes on any x86-64 CPU with AVX2, Intel or AMD.

Same-machine reruns were always byte-identical; across machines they were not, because torch and
MKL pick their kernels by the CPU they find (AVX2 or AVX-512, Intel or AMD) and a different kernel
sums in a different order. Training amplifies a last-bit difference into a different model. So
(measured in docs/reproducibility.md):

- torch's own kernels (softmax, norms, reductions, AdamW) run the AVX2 build: ATEN_CPU_CAPABILITY;
- MKL's matmul (every fp32 nn.Linear, bmm, grouped_mm and attention on CPU) runs its COMPATIBLE
  conditional-numerical-reproducibility path: MKL_CBWR=COMPATIBLE, the one mode MKL documents for
  non-Intel CPUs as well as Intel ones. Its AVX2 mode, used before, holds on Intel only: on an AMD
  CPU MKL falls back to its automatic choice, and an AMD-trained and an Intel-trained model
  differed (val PPL 60.88 against 60.11, docs/reproducibility.md). COMPATIBLE splits its sums by
  thread, so the thread count (`numerics.threads`, a DVC param) is part of what decides the bytes;
- numpy's runtime-dispatched SIMD loops (the noise fit) stop at AVX2; its least squares goes
  through lstsq_exact below instead of LAPACK;
- oneDNN is capped at AVX2 too (no fp32 op of these models calls it today);
- every stage runs on `numerics.threads` intra-op threads;
- square roots go through `sqrt` below (IEEE's, correctly rounded), and training uses the fused
  AdamW: torch's CPU `sqrt` (and so the for-each AdamW) runs MKL VML's high-accuracy kernel, which is
  not correctly rounded and whose last bit differs between Intel and AMD whatever MKL_CBWR says
  (`scripts/numerics_fingerprint.py`: op.sqrt and op.adamw were the only ops that differed; on an
  Intel Xeon 17% of float32 square roots differ from the correctly rounded value).

The variables must be set before torch and numpy load their kernels; `import romer` does it
(romer/__init__.py), and every stage, test and benchmark imports romer first. A variable the user
set already is kept; `ROMER_NUMERICS=native` skips the pinning (faster, not reproducible
elsewhere). Neither is a DVC param: after switching, rerun with `dvc repro --force`.
"""

from __future__ import annotations

import os

# Each: the library's own switch and the value that holds it to the AVX2 code path.
PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels
    "MKL_CBWR": "COMPATIBLE",  # MKL conditional numerical reproducibility, the same on Intel and AMD
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL's other domains capped at AVX2
    "MKL_DYNAMIC": "FALSE",  # MKL uses the threads it is given (CNR needs a fixed count)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (mkldnn) kernels
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # numpy's runtime-dispatched SIMD loops
}
# Not numerical: an idle OpenMP thread spins 1000 times (libgomp's own value for an oversubscribed CPU)
# before it sleeps; on a shared CPU that made a training step 2x faster (docs/builtin_model.md).
SPEED = {"GOMP_SPINCOUNT": "1000"}


def native() -> bool:
    return os.environ.get("ROMER_NUMERICS", "pinned") == "native"


def pin_environment() -> None:
    """Set the pins (keeping values the user set) before torch or numpy is imported."""
    for k, v in SPEED.items():
        os.environ.setdefault(k, v)
    if native():
        return
    for k, v in PINS.items():
        os.environ.setdefault(k, v)


def cpu_info() -> dict:
    """The first CPU's `vendor_id`, `model name` and `flags` from /proc/cpuinfo (empty off Linux)."""
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "model name", "flags") and key not in info:
                info[key] = value.strip()
    except OSError:
        pass
    return {"vendor": info.get("vendor_id", "unknown"), "model": info.get("model name", "unknown"),
            "flags": set(info.get("flags", "").split())}


def set_determinism(threads: int | None) -> None:
    """Runtime part of the pinning: a fixed intra-op thread count, deterministic algorithms, and a
    check that the pins are in force (a misspelt variable, or torch imported before romer, would
    otherwise change the numbers silently)."""
    import torch

    from romer.core.errors import UserError

    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)
    cap = torch.backends.cpu.get_cpu_capability()
    if not native() and os.environ.get("ATEN_CPU_CAPABILITY") == "avx2" and "avx2" in cpu_info()["flags"] and cap != "AVX2":
        raise UserError(f"numerical pins not in force: torch runs its {cap} kernels, not AVX2 (was torch "
                        "imported before romer?); see romer/core/numerics.py")


def sqrt(t):
    """Elementwise square root, correctly rounded, so the same bytes on every CPU.

    torch's CPU `sqrt` calls MKL VML (high accuracy, not correctly rounded), and its last bit
    depends on the CPU's vendor; numpy's is the IEEE instruction. On other devices, or with
    ROMER_NUMERICS=native, torch's own is used."""
    if t.device.type != "cpu" or native():
        return t.sqrt()
    import numpy as np
    import torch

    return torch.from_numpy(np.sqrt(t.detach().contiguous().numpy()))


def modes() -> dict:
    """The numerical modes that decide the bytes of a result (eval.json, MLflow), the intra-op thread
    count included: MKL's COMPATIBLE mode splits its sums by thread (docs/reproducibility.md)."""
    import torch

    return {"mode": "native" if native() else "pinned", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR"), "threads": torch.get_num_threads()}


def lstsq_exact(A, b):
    """Least-squares solution of A x = b (A [n, p], b [n], float64), independent of the CPU.

    LAPACK's lstsq runs whichever BLAS kernel the CPU selects, and its last bits differ between
    machines. Here the normal equations are formed and solved exactly in rationals, and each
    coefficient is rounded once to float64: the exact least-squares solution of the given floats,
    the same bytes on every machine. Meant for the small fits of the noise model (p <= 7).
    """
    from fractions import Fraction

    import numpy as np

    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if A.ndim != 2 or b.shape != (A.shape[0],):
        raise ValueError(f"lstsq_exact: need A [n, p] and b [n], got {A.shape} and {b.shape}")
    rows = [[Fraction(float(v)) for v in r] for r in A]
    rhs = [Fraction(float(v)) for v in b]
    p = A.shape[1]
    M = [[sum((r[i] * r[j] for r in rows), Fraction(0)) for j in range(p)]
         + [sum((r[i] * y for r, y in zip(rows, rhs)), Fraction(0))] for i in range(p)]
    for c in range(p):  # Gauss-Jordan elimination, exact
        piv = next((r for r in range(c, p) if M[r][c] != 0), None)
        if piv is None:
            raise np.linalg.LinAlgError(f"lstsq_exact: rank-deficient system (column {c} of {p})")
        M[c], M[piv] = M[piv], M[c]
        for r in range(p):
            if r != c and M[r][c] != 0:
                f = M[r][c] / M[c][c]
                M[r] = [x - f * y for x, y in zip(M[r], M[c])]
    return np.array([float(M[i][p] / M[i][i]) for i in range(p)])


def polyval_increasing(coef, x):
    """sum_k coef[k] x^k by Horner's rule, elementwise (no BLAS matrix-vector product)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for c in reversed(list(coef)):
        out = out * x + float(c)
    return out
