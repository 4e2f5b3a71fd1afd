"""The periphery of the analog arrays: input DAC, output noise, ADC, bound management.

This follows aihwkit's IO-managed forward (aihwkit.simulator.tiles.analog_mvm and RPUCuda's
forward pass), per array of `cim.tile` inputs (the last dim of every analog matmul). For one input
vector x of an array with weights W (normalised so that g_max reads as 1, i.e. W / (alpha w_max)):

1. noise management: s = max|x| (`abs_max`), s = nm_std_alpha * std(x) (`std`: an input range of
   alpha sigma, as aihwkit's learned input range initialised at 3 sigma; here per input vector,
   since nothing is trained), or s = 1 (`none`);
2. DAC: x_n = clip(round(x / s / d) * d, +-inp_bound), with d = inp_res * 2 inp_bound;
3. the array: y_n = W_n x_n, plus per-MVM weight read noise w_noise * sqrt(|W_n| x_n^2) z
   (aihwkit's PCM_READ w_noise type) and output noise out_noise * z;
4. ADC: y_n = clip(round(y_n / e) * e, +-out_bound), with e = out_res * 2 out_bound;
5. bound management `iterative`: a vector whose output clips is run again with its input scaled
   down by 2, 4, ... (up to max_bm_factor, and while the DAC step stays below max_bm_res);
6. y = y_n * s * alpha * w_max, summed over the input arrays, in digital.

The engine is a TorchFunctionMode, entered only while an analog module runs (forward pre- and
post-hooks on the modules that own analog tensors): it intercepts `linear` and `_grouped_mm`
whose weight lives in an analog tensor, so nn.Linear, routers and transformers' fused experts
under grouped_mm (or an eager experts loop) all go through it. Noise draws come from one generator
per device, reseeded for every noisy state and before every measurement pass (`reseed`), so a run
is deterministic and the methods evaluated on one chip see the same stream. Noise management and
bound management decide per input vector, so those decisions do not depend on the batch a token
sits in; the noise values do depend on its place in the stream. Steps 2 and 4-6 run as two fused
kernels (romer.cim.kernels, torch.compile; exact, and eager where compilation is unavailable).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from romer.cim import kernels
from romer.cim.mapping import AnalogWeights, tensor_seed
from romer.core.errors import UserError

NOISE_MANAGEMENTS = ("abs_max", "std", "none")
BOUND_MANAGEMENTS = ("iterative", "none")
# Rows of a matmul handled at a time, at most: bounds the temporaries. Wider matrices take fewer rows
# (`_row_chunk`), so that a chunk's outputs stay within the part of the noise pool one matmul may read.
ROW_CHUNK = 1 << 13


@dataclass(frozen=True)
class PeripheryConfig:
    """One periphery setting; resolutions are fractions of the full range (1 / steps), 0 = ideal."""

    name: str = "ideal"
    inp_res: float = 0.0
    inp_bound: float = 1.0
    noise_management: str = "abs_max"
    nm_std_alpha: float = 3.0
    out_res: float = 0.0
    out_bound: float = 0.0  # 0: unbounded
    out_noise: float = 0.0
    bound_management: str = "none"
    max_bm_factor: float = 1000.0
    max_bm_res: float = 0.25
    w_noise: float = 0.0
    weight_scaling: str = "row"  # the mapping this periphery goes with (romer.cim.mapping)
    # Output-noise normals: 0 draws each one fresh; k > 0 reads them from a pool of 2^k normals drawn
    # once per noisy state, at a fresh random offset per matmul (see `_randn`).
    noise_pool_log2: int = 24

    def __post_init__(self):
        if self.noise_management not in NOISE_MANAGEMENTS:
            raise ValueError(f"noise_management must be one of {NOISE_MANAGEMENTS}, got {self.noise_management!r}")
        if self.bound_management not in BOUND_MANAGEMENTS:
            raise ValueError(f"bound_management must be one of {BOUND_MANAGEMENTS}, got {self.bound_management!r}")
        for k in ("inp_res", "out_res", "out_bound", "out_noise", "w_noise", "max_bm_res"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"periphery {k} must be finite and >= 0, got {v}")
        if not (isinstance(self.noise_pool_log2, int) and 0 <= self.noise_pool_log2 <= 30):
            raise ValueError(f"periphery noise_pool_log2 must be an integer in [0, 30], got {self.noise_pool_log2}")
        for k in ("inp_bound", "nm_std_alpha", "max_bm_factor"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"periphery {k} must be finite and > 0, got {v}")
        if self.inp_res >= 1 or self.out_res >= 1:
            raise ValueError("periphery inp_res and out_res are 1/steps (< 1); 0 means ideal")

    @property
    def ideal(self) -> bool:
        return not (self.inp_res or self.out_res or self.out_noise or self.w_noise or self.out_bound)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "ideal": PeripheryConfig(),
    # aihwkit IOParameters() defaults: 7-bit DAC, 9-bit ADC, out_noise 0.06, abs-max noise management,
    # iterative bound management; with the weights scaled per array (weight_scaling_omega 1).
    "aihwkit-io-default": PeripheryConfig(
        name="aihwkit-io-default", inp_res=1 / 126, inp_bound=1.0, noise_management="abs_max", out_res=1 / 510,
        out_bound=12.0, out_noise=0.06, bound_management="iterative", weight_scaling="tile"),
    # aihwkit StandardHWATrainingPreset forward: 8-bit DAC and ADC, out_bound 10, out_noise 0.04,
    # PCM_READ w_noise 0.0175, inputs in a 3-sigma range, no bound management, per-row weight scaling.
    # Not modelled: its ir_drop (1.0) and the learned (static) input range, replaced by a per-vector one.
    "aihwkit-hwa": PeripheryConfig(
        name="aihwkit-hwa", inp_res=1 / 254, inp_bound=1.0, noise_management="std", nm_std_alpha=3.0,
        out_res=1 / 254, out_bound=10.0, out_noise=0.04, bound_management="none", w_noise=0.0175,
        weight_scaling="row"),
}


def periphery_config(preset: str, **overrides) -> PeripheryConfig:
    """A preset with explicit keys overriding it (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown periphery preset {preset!r}; known: {list(PRESETS)}")
    over = {k: v for k, v in overrides.items() if v is not None}
    cfg = PRESETS[preset]
    return replace(cfg, name=preset if not over else f"{preset}+custom", **over) if over else cfg


class Periphery(TorchFunctionMode):
    """Runs every analog matmul of a model through the periphery (see the module docstring)."""

    def __init__(self, weights: AnalogWeights, config: PeripheryConfig):
        super().__init__()
        self.weights = weights
        self.cfg = config
        self.enabled = False
        self._by_storage = {}
        self._gens = {}
        self._pools = {}
        self._pool_cache = {}  # device -> ((seed, k), pool, generator state after drawing it)
        self._tables = {}
        self._seed = 0
        self._abs = {}
        self._depth = 0
        self._hooks = []
        # Digital per-column calibration (the affine_columns baseline): {name: (gain, offset) [M, out]}
        # applied to every analog matmul's output, and the sums it is fitted from while `_fit` is set.
        self.column_affine = None
        self._fit = None
        self._clean_dev = {}

    # ---- state -----------------------------------------------------------------------------
    def reseed(self, seed: int):
        """Start the noise stream of a new noisy state (and forget cached |W|)."""
        self._seed = int(seed)
        self._gens = {}
        self._pools = {}
        self._tables = {}
        self._abs = {}
        self._by_storage = {}
        for rec in self.weights.records:
            if self.weights.scale(rec.name) is not None:
                self._by_storage[rec.tensor.untyped_storage().data_ptr()] = rec

    def _gen(self, device) -> torch.Generator:
        """The state's generator on `device`. With a noise pool, the pool is its first draw, so the
        stream does not depend on which matmul needs it first, and a reseed to the seed of the
        previous state (every method evaluated on one chip) reuses the pool instead of redrawing it."""
        key = str(device)
        g = self._gens.get(key)
        if g is None:
            g = self._gens[key] = torch.Generator(device=device)
            g.manual_seed(tensor_seed(self._seed, "periphery"))
            k = self.cfg.noise_pool_log2
            if k:
                cached = self._pool_cache.get(key)
                if cached is not None and cached[0] == (self._seed, k):
                    self._pools[key] = cached[1]
                    g.set_state(cached[2])
                else:
                    self._pool_cache.pop(key, None)  # one pool per device at a time: 128 MiB for k = 24
                    base = torch.randn(1 << k, generator=g, device=device, dtype=torch.float32)
                    pool = self._pools[key] = torch.cat([base, base])  # a window of <= 2^k from below 2^k is contiguous
                    self._pool_cache[key] = ((self._seed, k), pool, g.get_state())
        return g

    def _randn(self, shape, like: torch.Tensor) -> torch.Tensor:
        """N(0,1) noise of `shape`. Drawing every normal costs ~5 ns on a CPU, more than the matmul
        whose outputs it perturbs in a 128-wide model, so by default the normals of one noisy state
        come from a pool of 2^k exact normals (drawn once per state, 0.1 s for k = 24), read at a
        fresh uniformly random offset for every matmul that needs at most 2^(k-4) of them (larger
        ones draw fresh): each value is exactly N(0,1), and two given outputs share a draw only if
        their offsets line up, with probability 2^-k per pair."""
        gen = self._gen(like.device)
        n = math.prod(shape)
        k = self.cfg.noise_pool_log2
        if k == 0 or n > (1 << max(k - 4, 0)):  # a matmul reads at most 1/16 of the pool, else fresh draws
            return torch.randn(shape, generator=gen, device=like.device, dtype=torch.float32)
        pool = self._pools[str(like.device)]
        r = int(torch.randint(0, 1 << k, (1,), generator=gen, device=like.device))
        return pool[r:r + n].view(shape)

    # ---- digital per-column calibration ---------------------------------------------------
    def start_column_fit(self):
        """Collect, per output column of every analog matrix, the sums of its gain calibration
        (y: the periphery's output, y_ideal: the clean weights' exact output for the same input),
        until finish_column_fit. What a chip's digital periphery calibrates per column."""
        self._fit, self.column_affine = {}, None

    def finish_column_fit(self) -> dict:
        """Per column, the gain a and offset b of y ~ a y_ideal + b (least squares), inverted into the
        digital correction (y - b) / a, installed and returned as (gain 1/a, offset -b/a) [M, out].
        Regressing y on y_ideal, not the reverse, keeps the correction unbiased: the reverse (the
        MSE-optimal Wiener gain) shrinks every output by its noise share, and measured on validation
        that shrinkage compounds through the layers to a PPL worse than no repair
        (docs/ablation.md). A column with no rows or no ideal-output variance keeps gain 1, offset 0."""
        out = {}
        for name, (n, sy, st, stt, syt) in self._fit.items():
            nn = n.clamp(min=1)
            my, mt = sy / nn, st / nn
            var_t, cov = stt / nn - mt * mt, syt / nn - my * mt
            ok = (n > 1) & (var_t > 1e-12 * (stt / nn).clamp(min=1e-300)) & (cov.abs() > 1e-12 * var_t)
            a = torch.where(ok, cov / torch.where(ok, var_t, torch.ones_like(var_t)), torch.ones_like(var_t))
            b = torch.where(ok, my - a * mt, torch.zeros_like(my))
            out[name] = ((1 / a).float(), (-b / a).float())
        self._fit, self._clean_dev = None, {}
        self.column_affine = out
        return out

    def _clean_view(self, rec, w):
        """The clean weights, viewed exactly as `w` views the analog tensor (same shape and strides)."""
        c = self._clean_dev.get(rec.name)
        if c is None:
            c = self._clean_dev[rec.name] = self.weights.clean(rec.name).to(w.device, w.dtype).contiguous()
        if not rec.tensor.is_contiguous():
            raise RuntimeError(f"periphery: column calibration needs {rec.name} contiguous")
        return c.as_strided(w.size(), w.stride(), w.storage_offset() - rec.tensor.storage_offset())

    def _columns(self, rec, y, ideal, idx, M):
        """Per-column step on y [N, out] of matrices idx (an int for a whole matmul, or [N] row ->
        matrix): accumulate the fit's sums against `ideal` (a thunk), or apply the installed affine."""
        if self._fit is not None:
            t = ideal().double()
            yd = y.double()
            sums = self._fit.get(rec.name)
            if sums is None:
                z = torch.zeros((M, y.shape[-1]), dtype=torch.float64, device=y.device)
                sums = self._fit[rec.name] = [torch.zeros((M, 1), dtype=torch.float64, device=y.device)] + [
                    z.clone() for _ in range(4)]
            terms = (torch.ones_like(yd[:, :1]), yd, t, t * t, yd * t)
            for acc, v in zip(sums, terms):
                if isinstance(idx, int):
                    acc[idx] += v.sum(0)
                else:
                    acc.index_add_(0, idx, v)
            return y
        if self.column_affine is not None and rec.name in self.column_affine:
            g, c = self.column_affine[rec.name]
            g, c = g.to(y.device), c.to(y.device)
            return y * g[idx] + c[idx]
        return y

    # ---- installation ----------------------------------------------------------------------
    def install(self, model: torch.nn.Module):
        """Hook the modules that own analog tensors: the mode is on while they run."""
        impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
        if impl not in (None, "grouped_mm", "eager"):
            raise UserError(f"the periphery sees fused experts under experts_implementation 'grouped_mm' or 'eager', "
                            f"not {impl!r} (its matmuls would stay ideal): load the model with one of those, or "
                            f"set cim.periphery.preset: ideal")
        ptrs = {r.tensor.untyped_storage().data_ptr() for r in self.weights.records}
        for module in model.modules():
            if any(p.untyped_storage().data_ptr() in ptrs for p in module.parameters(recurse=False)):
                self._hooks.append(module.register_forward_pre_hook(self._enter_hook))
                self._hooks.append(module.register_forward_hook(self._exit_hook, always_call=True))
        return self

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _enter_hook(self, module, args):
        if self.enabled:
            if self._depth == 0:
                self.__enter__()
            self._depth += 1

    def _exit_hook(self, module, args, output):
        if self._depth:
            self._depth -= 1
            if self._depth == 0:
                self.__exit__(None, None, None)

    # ---- dispatch --------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            rec = self._lookup(w)
            if rec is not None:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return self._linear(args[0] if args else kwargs["input"], w, bias, rec)
        elif func is torch._grouped_mm:
            w = args[1]
            rec = self._lookup(w)
            if rec is not None and kwargs.get("bias") is None and w.dim() == 3:
                offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
                return self._grouped(args[0], w, offs, rec, kwargs.get("out_dtype"))
        return func(*args, **kwargs)

    def _lookup(self, w):
        if not isinstance(w, torch.Tensor) or not self._by_storage:
            return None
        return self._by_storage.get(w.untyped_storage().data_ptr())

    # ---- matmuls ---------------------------------------------------------------------------
    def _linear(self, x, w, bias, rec):
        """F.linear through the periphery; `w` is the record's matrix or, for a fused record used by
        an eager experts loop, one of its matrices (found from its storage offset)."""
        n_out, n_in = rec.tensor.shape[-2], rec.tensor.shape[-1]
        if w.dim() != 2 or tuple(w.shape) != (n_out, n_in):
            raise RuntimeError(f"periphery: {rec.name} reached F.linear as a {tuple(w.shape)} view; only whole "
                               f"[{n_out}, {n_in}] matrices are supported")
        m = (w.storage_offset() - rec.tensor.storage_offset()) // (n_out * n_in)
        mask = self.weights.digital_mask(rec.name)
        if mask is not None and bool(mask[m]):
            return F.linear(x, w, bias)
        tabs = self._adc_tables(rec)  # each [nt, M, out]
        nt = tabs[0].shape[0]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        wt = w.t()  # [in, out]

        def mm(xs, a, b, absw=False):
            ww = self._absw((rec.name, m), w).t()[a:b] if absw else wt[a:b]
            return xs.to(ww.dtype) @ ww

        def scale_of(rows, t):
            return tuple(None if tab is None else tab[t, m:m + 1] for tab in tabs), None

        rows = self._row_chunk(n_out)
        if x2.shape[0] <= rows:
            y = self._mvm(x2, mm, scale_of, nt, w.shape[-1]).to(x.dtype)
        else:
            y = torch.empty((x2.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
            for r0 in range(0, x2.shape[0], rows):
                self._mvm(x2[r0:r0 + rows], mm, scale_of, nt, w.shape[-1], out=y[r0:r0 + rows])
        if self._fit is not None or self.column_affine is not None:
            M = rec.tensor.numel() // (n_out * n_in)
            y = self._columns(rec, y, lambda: x2.to(w.dtype) @ self._clean_view(rec, w).t(), m, M).to(x.dtype)
        y = y.reshape(*shape[:-1], w.shape[0])
        return y if bias is None else y + bias

    def _grouped(self, x, w_t, offs, rec, out_dtype):
        """torch._grouped_mm(x [S, in], w_t [E, in, out], offs) through the periphery."""
        tabs = self._adc_tables(rec)  # each [nt, E, out]
        nt = tabs[0].shape[0]
        E = w_t.shape[0]
        counts = torch.diff(offs.to(torch.int64), prepend=offs.new_zeros(1, dtype=torch.int64))
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts)  # expert of each row
        n = expert.numel()
        out = torch.empty((x.shape[0], w_t.shape[-1]), dtype=out_dtype or x.dtype, device=x.device)
        out[n:].zero_()  # rows past the last group (if any) are not any expert's: 0, as _grouped_mm leaves them
        if n == 0:
            return out
        rows = self._row_chunk(w_t.shape[-1])
        for r0 in range(0, n, rows):
            ex = expert[r0:r0 + rows]
            xs = x[r0:r0 + ex.numel()]

            def mm(xr, a, b, absw=False, rows=None):
                e = ex if rows is None else ex[rows]
                o = torch.cumsum(torch.bincount(e, minlength=E), 0).to(torch.int32)
                ww = self._absw(rec.name, w_t) if absw else w_t
                xr = xr.to(ww.dtype)
                if b - a != ww.shape[1]:  # one input array of several: _grouped_mm needs 16-byte aligned rows
                    ww = self._slice(rec, ww, a, b, absw)
                    pad = ww.shape[1] - (b - a)
                    if pad:
                        xr = F.pad(xr, (0, pad))
                return torch._grouped_mm(xr.contiguous(), ww, offs=o)

            dest = out[r0:r0 + ex.numel()]
            direct = self._fit is None and self.column_affine is None  # the column step reads float32 outputs
            y = self._mvm(xs, mm, lambda rows, t, ex=ex: (tuple(None if tab is None else tab[t] for tab in tabs),
                                                          ex if rows is None else ex[rows]),
                          nt, w_t.shape[-2], grouped=True, out=dest if direct else None)
            if self._fit is not None or self.column_affine is not None:
                def ideal(xs=xs, ex=ex):
                    o = torch.cumsum(torch.bincount(ex, minlength=E), 0).to(torch.int32)
                    return torch._grouped_mm(xs.to(w_t.dtype).contiguous(), self._clean_view(rec, w_t), offs=o)
                y = self._columns(rec, y, ideal, ex, E)
            mask = self.weights.digital_mask(rec.name)
            if mask is not None and bool(mask[ex].any()):
                o = torch.cumsum(torch.bincount(ex, minlength=E), 0).to(torch.int32)
                exact = torch._grouped_mm(xs.to(w_t.dtype).contiguous(), w_t, offs=o)
                y = torch.where(mask[ex].unsqueeze(-1), exact.to(y.dtype), y)
            if y is not dest:  # the column calibration or digital experts made a new tensor
                dest.copy_(y)
        return out

    def _row_chunk(self, n_out: int) -> int:
        """Rows per chunk of a matmul with n_out outputs: ROW_CHUNK, or fewer where the chunk's outputs
        would exceed the 2^(k-4) normals one matmul may take from the pool (`_randn`), which would
        draw them all fresh (measured: 0.7 s of a 4 s batch at hidden 1024). Every matrix of the
        builtin and family models (<= 128 outputs where a matmul has more than 4096 rows) keeps 8192."""
        k = self.cfg.noise_pool_log2
        if k == 0:
            return ROW_CHUNK
        return max(1, min(ROW_CHUNK, (1 << max(k - 4, 0)) // max(n_out, 1)))

    def _steps(self):
        """(DAC step, ADC step) in units of the full input and output ranges; 1 where ideal."""
        c = self.cfg
        d_in, e_out = c.inp_res * 2 * c.inp_bound, c.out_res * 2 * c.out_bound
        return (d_in if d_in > 0 else 1.0), (e_out if e_out > 0 else 1.0)

    def _adc_tables(self, rec):
        """The ADC's per-matrix factors of a tensor, each contiguous [n_input_arrays, M, out] and built
        once per state from ws = alpha * w_max: the gain to ADC steps (dq / eq) / ws, the read-noise
        variance gain dq^2 / ws (None without read noise) and the step back to real units ws * eq.
        An all-zero matrix (ws = 0) reads exactly 0. Per element these are the same float operations
        the ADC loop would do, so the outputs are the same bytes."""
        tabs = self._tables.get(rec.name)
        if tabs is None:
            dq, eq = self._steps()
            ws = self.weights.scale(rec.name).permute(2, 0, 1).contiguous().float()
            inv = torch.where(ws > 0, ws.reciprocal(), torch.zeros_like(ws))
            tabs = self._tables[rec.name] = (inv * (dq / eq), inv * (dq * dq) if self.cfg.w_noise > 0 else None,
                                             ws * eq)
        return tabs

    def _slice(self, rec, w, a, b, absw):
        """Inputs a:b of a grouped weight [E, in, out], contiguous and zero-padded to 8 rows."""
        key = (rec.name, a, b, absw)
        s = self._abs.get(key)
        if s is None:
            s = w[:, a:b, :].contiguous()
            pad = -(b - a) % 8
            s = self._abs[key] = F.pad(s, (0, 0, 0, pad)) if pad else s
        return s

    def _absw(self, key, w):
        a = self._abs.get(key)
        if a is None:
            a = self._abs[key] = w.abs()
        return a

    def _mvm(self, x, mm, scale_of, nt, n_in, grouped=False, out=None):
        """Sum over input arrays of the periphery-managed array outputs, in real units [N, out]; written
        into `out` where given (the ADC loop stores there: no copy of the outputs afterwards).

        Inputs are carried in DAC steps and outputs in ADC steps, so that each step of the
        periphery is one elementwise pass (rounding, noise, clipping) over the vector."""
        c = self.cfg
        R = self.weights.input_tile(n_in)  # the mapping's arrays (the last one may be narrower)
        d_in = c.inp_res * 2 * c.inp_bound
        e_out = c.out_res * 2 * c.out_bound
        dq, eq = self._steps()
        x_lim, y_lim = c.inp_bound / dq, c.out_bound / eq
        limit = min(c.max_bm_factor, c.max_bm_res / d_in if d_in > 0 else math.inf)
        # |x / s| <= 1 under abs-max management, so the DAC range holds it when it ends on a step
        do_clamp = not (c.noise_management == "abs_max" and c.inp_bound >= 1 and (d_in == 0 or float(x_lim).is_integer()))
        y_lim = y_lim if c.out_bound > 0 else 0.0
        # the ADC stores into `out`, unless the arrays' sum must stay in float32 until the end
        store = out if out is not None and (nt == 1 or out.dtype == torch.float32) else None
        y = None
        for t in range(nt):
            a, b = t * R, min(n_in, (t + 1) * R)
            xt = x[:, a:b].to(torch.float32)
            if c.noise_management == "std":
                s0 = xt.std(dim=-1, keepdim=True, correction=0).mul_(c.nm_std_alpha)
                s0 = torch.where(s0 > 0, s0, torch.ones_like(s0))
            elif c.noise_management == "none":
                s0 = torch.ones((xt.shape[0], 1), dtype=torch.float32, device=xt.device)
            else:
                s0 = None  # abs-max: found inside the DAC kernel

            def run(rows, s, dest=None):
                xs = xt if rows is None else xt[rows]
                # abs-max scaled inputs already lie in the DAC range: the clamp is skipped then
                xq, xq2, ss = kernels.dac(xs, s, dq, x_lim, d_in > 0, do_clamp, c.w_noise > 0)
                kw = {} if not grouped else {"rows": rows}
                (inv_gain, inv_var, mul), idx = scale_of(rows, t)  # ADC factors per matrix, the matrix of each row
                u = mm(xq, a, b, **kw).to(torch.float32)
                var = z_w = z_o = None
                if c.w_noise > 0:  # w_noise sqrt(|W_n| x_n^2), |W_n| = |W'| / ws, x_n = xq dq
                    var = mm(xq2, a, b, absw=True, **kw).to(torch.float32)
                    z_w = self._randn(u.shape, u)
                if c.out_noise > 0:
                    z_o = self._randn(u.shape, u)
                yt, clipped = kernels.adc(u, inv_gain, inv_var, mul, idx, var, z_w, z_o, ss, c.w_noise / eq,
                                          c.out_noise / eq, e_out > 0, y_lim, dest)
                return (yt if dest is None else dest), clipped, ss

            yt, clipped, s1 = run(None, s0, store if t == 0 else None)
            if c.bound_management == "iterative" and clipped is not None and bool(clipped.any()):
                red = 1.0
                rows = clipped.nonzero().squeeze(-1)
                while rows.numel() and red <= limit:
                    red *= 2.0
                    yr, cl, _ = run(rows, s1[rows] * red)
                    yt[rows] = yr.to(yt.dtype)
                    rows = rows[cl]
            y = yt if y is None else y.add_(yt)
        if out is not None and y is not out:
            out.copy_(y)
            y = out
        return y


def out_rel_err(y_noisy: torch.Tensor, y: torch.Tensor) -> float:
    """||y' - y|| / ||y||."""
    return float((y_noisy.double() - y.double()).norm() / y.double().norm())
