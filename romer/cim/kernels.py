"""Elementwise work compiled into single loops: the periphery's DAC and ADC sides (below), and the
noise pass's device chain (romer.cim.mapping.device_chain, which uses `Kernel`).

Written eagerly, the DAC/ADC path of `romer.cim.periphery` is a dozen passes over [rows, out]
tensors per input array (scale gather, reciprocal, noise, rounding, clipping, rescale), and on a
CPU those passes cost more than the matmul between them (the periphery ran at half the speed of a
plain forward on the builtin model). Each function below is compiled once by torch.compile into
one loop, with dynamic shapes so that a new batch size does not recompile.

Compiled and eager give the same bytes: only exact operations are fused (products, rounding,
clamping, max, sqrt; no sums), in the order the eager code writes them. Where compilation is not
available (no C++ compiler, an unsupported platform) the functions run eagerly, with a single
warning; `ROMER_COMPILE=0` forces that.

torch.compile keeps its compiled kernels on disk (TORCHINDUCTOR_CACHE_DIR), under a key that leaves
out torch's CPU capability. A kernel compiled under one capability (the pinned AVX2, or AVX-512
under ROMER_NUMERICS=native) was then loaded under the other, where it computed wrong abs-max
scales silently (AVX-512 kernel, AVX2 process) or corrupted the heap (the other way round):
measured on an AVX-512 Xeon, torch 2.13. So each capability gets its own cache directory.
"""

from __future__ import annotations

import os
import warnings

import torch

from romer.core.numerics import sqrt as _ieee_sqrt


def use_capability_cache_dir() -> str:
    """Point torch.compile's on-disk cache at a directory of this process's CPU capability (the one
    set, or the default, with `romer-<capability>` appended; an inherited `romer-*` is replaced)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    if os.path.basename(os.path.normpath(base)).startswith("romer-"):
        base = os.path.dirname(os.path.normpath(base))
    path = os.path.join(base, f"romer-{torch.backends.cpu.get_cpu_capability().lower()}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


class Kernel:
    """`fn`, compiled on first use; falls back to eager for good if compilation fails."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None
        self.failed = os.environ.get("ROMER_COMPILE", "1") == "0"

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.compiled is None:
                    import torch._dynamo

                    cfg = torch._dynamo.config
                    cfg.recompile_limit = max(getattr(cfg, "recompile_limit", 8), 64)
                    use_capability_cache_dir()
                    self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
                return self.compiled(*args)
            except Exception as exc:  # no compiler, unsupported backend: the eager function is exact too
                self.failed = True
                warnings.warn(f"{self.fn.__name__.lstrip('_')} runs eagerly (torch.compile failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})", RuntimeWarning, stacklevel=2)
        return self.fn(*args)


def _dac(x, s, step: float, x_lim: float, do_round: bool, do_clamp: bool, square: bool):
    """Inputs [N, R] (float32) to DAC steps of size `step`. `s` [N, 1] is the noise-management
    scale, or None for abs-max (found here). Returns (x in DAC steps, its square or None, the scale)."""
    if s is None:
        s = x.abs().amax(dim=-1, keepdim=True)
        s = torch.where(s > 0, s, torch.ones_like(s))
    xq = x * (1.0 / (s * step))
    if do_round:
        xq = torch.round(xq)
    if do_clamp:
        xq = torch.clamp(xq, -x_lim, x_lim)
    return xq, (xq * xq if square else None), s


def _sqrt(x):
    """Correctly rounded in both paths: compiled code uses the vector instruction, eager torch would
    use MKL VML's (vendor-dependent last bit; romer.core.numerics.sqrt)."""
    if torch.compiler.is_compiling():
        return torch.sqrt(x)
    return _ieee_sqrt(x)


def _adc(u, inv_gain, inv_var, mul, idx, var, z_w, z_o, ss, w_coef: float, o_coef: float, do_round: bool,
         y_lim: float, out=None):
    """Array outputs [N, out] to real units. The tables [E or 1, out] are per matrix (the periphery's
    `_adc_tables`): the ADC gain over alpha * w_max, the read-noise variance gain over it, and the
    ADC step times it; `idx` [N] is the matrix of each row (None: row 0 for all). `var` is the
    weight-read variance matmul (None: no read noise), z_w and z_o its and the output noise's
    normals (None: none). Returns (outputs, which rows clipped at the ADC bound, or None); the
    outputs are written into `out` (of any float dtype) where given: compiled, that is the loop's own
    store, not a second pass."""
    if idx is not None:
        inv_gain, mul = inv_gain.index_select(0, idx), mul.index_select(0, idx)
        inv_var = None if inv_var is None else inv_var.index_select(0, idx)
    u = u * inv_gain  # in ADC steps
    if var is not None:
        u = u + _sqrt(torch.clamp(var * inv_var, min=0)) * z_w * w_coef
    if z_o is not None:
        u = u + z_o * o_coef
    if do_round:
        u = torch.round(u)
    clipped = None
    if y_lim > 0:
        clipped = u.abs().amax(dim=-1) > y_lim
        u = torch.clamp(u, -y_lim, y_lim)
    y = u * mul * ss
    if out is None:
        return y, clipped
    out.copy_(y)
    return out, clipped


dac = Kernel(_dac)
adc = Kernel(_adc)
