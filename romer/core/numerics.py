"""Numerical modes pinned so that a run gives the same bytes on any x86-64 CPU with AVX2.

Same-machine reruns were always byte-identical; across machines they were not, because torch,
MKL, oneDNN and numpy each pick their kernels by the CPU they find (AVX2 or AVX-512, Intel or AMD)
and by the thread count, and a different kernel sums in a different order. Training amplifies a
last-bit difference into a different model. So every library is held to the AVX2 code path and
every stage runs on a fixed number of intra-op threads (`numerics.threads`).

The environment variables must be set before torch and numpy load their kernels; `import romer`
does it (romer/__init__.py), and every stage, test and benchmark imports romer first. A variable the
user set already is kept; `ROMER_NUMERICS=native` skips the pinning altogether (faster on an AVX-512
CPU, not reproducible elsewhere). docs/reproducibility.md has the measurements behind each pin.
"""

from __future__ import annotations

import os

# Each: the library's own switch, the value that holds it to the AVX2 code path.
PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels (softmax, norms, reductions, ...)
    "MKL_CBWR": "AVX2,STRICT",  # MKL conditional numerical reproducibility (torch's BLAS: matmul)
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL's other domains (vector math) capped at AVX2
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


def set_determinism(threads: int | None) -> None:
    """Runtime part of the pinning: deterministic algorithms and a fixed intra-op thread count."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)


def modes() -> dict:
    """The numerical modes in force, for eval.json and MLflow (what a rerun elsewhere must match)."""
    import torch

    return {
        "pinned": not native(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in PINS},
    }
