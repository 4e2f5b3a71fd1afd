"""Weights on analog CIM arrays: map to conductances, add device noise in place, restore exactly.

This is the converter half (as aihwkit's conductance converters); the device physics is a
romer.cim.noise_models.NoiseModel. The mapping (DESIGN.md, "Mapping weights to CIM", docs/noise.md):

- Every tensor's last dim is the input dim; every leading index is an output row, so a fused
  expert tensor [E, out, in] is E*out rows and a Linear weight [out, in] is out rows.
- Arrays: a matrix is cut into crossbar arrays of `tile` = (rows, cols): `rows` inputs by `cols`
  outputs (None: one array per matrix). Each array is its own physical tile.
- Weight scaling: `row` (one abs-max w_max per output row of each array, aihwkit's columnwise
  mapping) or `tile` (one w_max per array, aihwkit's default mapping with weight_scaling_omega 1).
  With `range_crest` k, full scale is max(abs-max, k * rms) of the same weights: the dynamic-range
  headroom that heavy-tailed (outlier) rows of real LLMs force on their typical weights.
- Differential pair: G+ = max(w,0)/w_max*g_max, G- = max(-w,0)/w_max*g_max, optionally
  quantised to `levels` evenly spaced conductances in [0, g_max] (0 and g_max included).
- Device noise on both devices, as aihwkit's PCMLikeNoiseModel: programming noise (sigma times
  prog_scale), clipped at 0; drift g_prog*(t/t0)^(-nu) for t > t0 with nu = |N(mean, std)| times
  drift_scale; read noise at t (sigma from the programmed state, times read_scale), clipped at 0.
  All scales are 1 at the published (or fitted) strength.
- Array-to-array variation (ArrayVariation, seeded per chip, off by default): per array a
  lognormal multiplier of the programming and read sigmas, a readout gain and a differential
  offset, and a fraction of devices stuck at 0 or g_max.
- Global drift compensation, as aihwkit's GlobalDriftCompensation: per array, alpha =
  mean|W_prog| / mean|W_t|, from the differential output of the array for the one-hot inputs
  (eye) read right after programming and at t. Common-mode conductance (both devices) cancels.
- w' = alpha * (G+ - G-) / g_max * w_max. `scale(name)` keeps alpha * w_max per output row and
  input array: the periphery (romer.cim.periphery) divides by it to get the array's normalised
  output, on which DAC, ADC and output noise act.

Noise is applied in place under a generator seeded from (seed, tensor name), on the tensor's
device, so a tensor's noise does not depend on which other tensors are analog; the array variation
has its own generator (seed, name, "arrays"), so switching it on leaves the device draws unchanged.
The same seed, device and shapes give bit-identical weights. The clean weights are kept once, on
the CPU (pinned when the tensor is on CUDA); the model is never deep-copied.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from romer.cim.kernels import Kernel
from romer.cim.noise_models import NoiseModel, exp, mul_add, nu_mean_std, sigma_prog, sigma_read
from romer.core import numerics
from romer.core.records import AnalogTensor

# Weights per block of the noise pass: fused tensors go through in blocks of whole matrices. A block's
# normals (6 per weight) are drawn into memory and read back by the device chain, so on a CPU a smaller
# block stays nearer the cache: on the 210 M-weight wide shape the pass took 12.9 s in blocks of 2^20
# against 20.4 s in blocks of 2^26 (benchmarks/noise_pass_blocks.py). The block boundaries set the order
# of the draws, and every tensor of the committed models (at most 2^19 weights) is one block either way.
CHUNK_ELEMENTS = 1 << 26  # on an accelerator
CPU_CHUNK_ELEMENTS = 1 << 20
WEIGHT_SCALINGS = ("row", "tile")


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor generator seed derived from (seed, name); stable across runs and processes."""
    h = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class ArrayVariation:
    """Chip-level array-to-array variation, seeded per chip (docs/noise.md). All 0: identical arrays.

    sigma_spread: std of ln(m), m the per-array multiplier of the programming and read sigmas.
    gain_std: std of the per-array readout gain (mean 1). offset_std: std of the per-array
    differential offset, in units of g_max (added to every weight of the array). stuck_frac:
    fraction of devices stuck, half at 0 (RESET) and half at g_max (SET), whatever their target.
    """

    sigma_spread: float = 0.0
    gain_std: float = 0.0
    offset_std: float = 0.0
    stuck_frac: float = 0.0

    def __post_init__(self):
        for k in ("sigma_spread", "gain_std", "offset_std", "stuck_frac"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"array variation {k} must be finite and >= 0, got {v}")
        if self.stuck_frac > 1:
            raise ValueError(f"array variation stuck_frac must be <= 1, got {self.stuck_frac}")

    @property
    def active(self) -> bool:
        return any((self.sigma_spread, self.gain_std, self.offset_std, self.stuck_frac))


def _arrays(n: int, size: Optional[int]) -> tuple:
    """(arrays along a dim of n, array size)."""
    size = n if size is None else min(int(size), n)
    return -(-n // size), size


def _device_chain(w, k, z, mult, stuck, curves: dict, levels_q: Optional[float], clip: bool, prog_scale: float,
                  read_scale: float, drift_scale: float, log_decay: Optional[float], stuck_frac: float, g_max: float,
                  want_prog: bool, prog_abs: bool):
    """The device physics of a block, elementwise: weights w [m, no, C, nt, R] (float32) at
    conductance scale k to the differential readout G+ - G- at read time, and (want_prog) right
    after programming (prog_abs: its magnitude, what drift compensation sums). z [draws, 2, *w.shape]:
    the normals (programming, drift exponent, read); stuck: uniforms of the stuck devices, or None;
    log_decay: ln(t0 / t) (None: no drift at t).

    Compiled into one loop over memory where `curves["exact"]` (romer.cim.kernels), eager otherwise;
    both give the same bytes (tests/test_cim.py): the multiply-adds round twice (noise_models.mul_add)
    and the drift factor is noise_models.exp, not torch's pow."""
    g = torch.stack((w.clamp(min=0), w.neg().clamp(min=0))).mul_(k)  # target conductances: g[0] = G+, g[1] = G-
    if levels_q is not None:
        g = g.mul_(levels_q).round_().div_(levels_q)
    sig = sigma_prog(g, curves["prog"]).mul_(prog_scale)
    if mult is not None:
        sig = sig.mul_(mult)
    g_prog = mul_add(z[0], sig, g)  # programming noise
    if clip:
        g_prog = g_prog.clamp_(min=0)
    g_now = g_prog
    i = 1
    if curves["drift"] is not None:
        mean, std = nu_mean_std(g, curves["drift"])
        nu = mul_add(z[i], std, mean).abs_().mul_(drift_scale)  # aihwkit: |N(mean, std)| * drift_scale
        i += 1
        if log_decay is not None:
            g_now = exp(nu.mul_(log_decay)).mul_(g_prog)  # g_prog * (t/t0)^(-nu)
    if curves["read"] is not None:
        sig = sigma_read(g_prog, g_now, curves["read"]).mul_(read_scale)
        if mult is not None:
            sig = sig.mul_(mult)
        g_now = mul_add(z[i], sig, g_now)
        if clip:
            g_now = g_now.clamp_(min=0)
    if stuck is not None:  # half at 0 (RESET), half at g_max (SET), whatever their target
        def fill(st):
            return torch.where(stuck < 0.5 * stuck_frac, 0.0, torch.where(stuck < stuck_frac, g_max, st))
        g_prog, g_now = fill(g_prog), fill(g_now)
    if not want_prog:
        return g_now[0] - g_now[1], None
    w_prog = g_prog[0] - g_prog[1]
    return g_now[0] - g_now[1], (w_prog.abs_() if prog_abs else w_prog)


device_chain = Kernel(_device_chain)


class AnalogWeights:
    """A set of weight tensors that live on simulated analog arrays.

    tensors: AnalogTensor records. Their tensors are modified in place by apply() and restore();
    a clean copy of each is kept on the CPU. tile: (rows, cols) of one array, rows = inputs,
    cols = outputs (None: one array per matrix).
    """

    def __init__(self, tensors: Iterable[AnalogTensor], noise_model: NoiseModel, tile: Optional[tuple] = None,
                 weight_scaling: str = "row", levels: Optional[int] = None,
                 variation: Optional[ArrayVariation] = None, range_crest: Optional[float] = None):
        if tile is not None:
            tile = tuple(int(v) for v in tile)
            if len(tile) != 2 or min(tile) < 1:
                raise ValueError(f"tile must be (rows, cols) with both >= 1, got {tile}")
        if weight_scaling not in WEIGHT_SCALINGS:
            raise ValueError(f"weight_scaling must be one of {WEIGHT_SCALINGS}, got {weight_scaling!r}")
        if levels is not None and int(levels) < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        if range_crest is not None and not (math.isfinite(range_crest) and range_crest > 0):
            raise ValueError(f"range_crest must be finite and > 0, got {range_crest}")
        self.range_crest = None if range_crest is None else float(range_crest)
        self.noise_model = noise_model
        self.tile = tile
        self.weight_scaling = weight_scaling
        self.levels = None if levels is None else int(levels)
        self.variation = variation if variation is not None and variation.active else None
        self._entries = []
        self._clean = {}
        self._where = {}  # (kind, layer, part, expert) -> name
        self._scale = {}  # name -> [M, out, n_input_arrays] alpha * w_max of the noisy state
        self._digital = {}  # name -> bool [M]: matrices put back to clean (digital) after noise
        self._curves = None  # (noise model, read time, device, its NoiseModel.curves) of the last block
        self._normals = {}  # CPU device -> the buffer the blocks' normals are drawn into (see _noisy_block)
        for rec in tensors:
            name, t = rec.name, rec.tensor
            if name in self._clean:
                raise ValueError(f"duplicate analog tensor name {name!r}")
            if not torch.is_floating_point(t):
                raise ValueError(f"{name}: analog weights must be floating point, got {t.dtype}")
            if t.dim() < 2:
                raise ValueError(f"{name}: analog weights need >= 2 dims (rows x inputs), got shape {tuple(t.shape)}")
            with torch.no_grad():
                clean = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
                clean.copy_(t.detach())
            self._clean[name] = clean
            self._where[(rec.kind, rec.layer, rec.part, rec.expert)] = name
            self._entries.append(rec)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def names(self):
        return [r.name for r in self._entries]

    @property
    def records(self):
        return list(self._entries)

    def clean(self, name: str) -> torch.Tensor:
        """The clean CPU copy of a tensor (read it, do not modify it)."""
        return self._clean[name]

    def clean_at(self, kind: str, layer: int, part: str, expert: Optional[int] = None) -> torch.Tensor:
        """The clean copy of the tensor at this place (another expert's weights, for a replica)."""
        return self._clean[self._where[(kind, layer, part, expert)]]

    def weight_bytes(self) -> int:
        return sum(r.tensor.numel() * r.tensor.element_size() for r in self._entries)

    def param_counts(self) -> dict:
        """Number of analog parameters per kind."""
        out = {}
        for r in self._entries:
            out[r.kind] = out.get(r.kind, 0) + r.tensor.numel()
        return out

    def input_tile(self, n_in: int) -> int:
        """Inputs per array for a matrix of n_in inputs."""
        return _arrays(n_in, None if self.tile is None else self.tile[0])[1]

    def scale(self, name: str) -> Optional[torch.Tensor]:
        """[M, out, n_input_arrays] alpha * w_max of the current noisy state (None: the tensor is clean)."""
        return self._scale.get(name)

    def digital_mask(self, name: str) -> Optional[torch.Tensor]:
        """bool [M]: which matrices of the tensor were put back to clean after noise (or None)."""
        return self._digital.get(name)

    @torch.no_grad()
    def keep_digital(self, name: str, index: int):
        """Put the clean weights back into matrix `index` of a tensor (hetero analog-digital)."""
        rec = next(r for r in self._entries if r.name == name)
        t = rec.tensor
        M = t.numel() // (t.shape[-1] * t.shape[-2])
        t.view(M, t.shape[-2], t.shape[-1])[index].copy_(self._clean[name].view(M, t.shape[-2], t.shape[-1])[index])
        mask = self._digital.get(name)
        if mask is None:
            mask = self._digital[name] = torch.zeros(M, dtype=torch.bool, device=t.device)
        mask[index] = True

    # ------------------------------------------------------------------ noise
    @torch.no_grad()
    def apply(self, seed: int, prog_scale: float = 1.0, read_scale: float = 1.0, drift_scale: float = 1.0,
              t_inference_s: float = 25.0, drift_compensation: bool = True, edit: Optional[Callable] = None,
              kinds: Optional[Iterable[str]] = None):
        """Copy the clean weights in, call edit(record) if given (it may rewrite record.tensor in
        place, e.g. program a replica), then add noise in place.

        kinds: if given, only tensors of these kinds get noise; the others stay clean (after edit).
        """
        for k, v in (("prog_scale", prog_scale), ("read_scale", read_scale), ("drift_scale", drift_scale)):
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"noise {k} must be finite and >= 0, got {v}")
        if not (t_inference_s > 0 and math.isfinite(t_inference_s)):
            raise ValueError(f"t_inference_s must be finite and > 0, got {t_inference_s}")
        kinds = None if kinds is None else set(kinds)
        scales = (float(prog_scale), float(read_scale), float(drift_scale))
        self._scale, self._digital = {}, {}
        for rec in self._entries:
            t = rec.tensor
            t.copy_(self._clean[rec.name], non_blocking=True)
            if edit is not None:
                edit(rec)
            if kinds is None or rec.kind in kinds:
                gen = torch.Generator(device=t.device)
                gen.manual_seed(tensor_seed(seed, rec.name))
                agen = None
                if self.variation is not None:
                    agen = torch.Generator(device=t.device)
                    agen.manual_seed(tensor_seed(seed, rec.name + "\x00arrays"))
                self._scale[rec.name] = self._add_noise_(t, gen, agen, scales, float(t_inference_s),
                                                         bool(drift_compensation))

    @torch.no_grad()
    def restore(self):
        """Copy the clean weights back (exact)."""
        for rec in self._entries:
            rec.tensor.copy_(self._clean[rec.name], non_blocking=True)
        self._scale, self._digital = {}, {}

    @contextmanager
    def noisy(self, seed: int, **kw):
        """`with aw.noisy(seed, prog_scale=...):` noisy weights inside, clean weights after."""
        self.apply(seed, **kw)
        try:
            yield self
        finally:
            self.restore()

    def array_variation(self, seed: int, name: str) -> Optional[dict]:
        """The chip's per-array variation of one tensor: {"sigma_mult", "gain", "offset"}, each
        [M, output arrays, input arrays] (None when variation is off). What a chip-level noise
        model tells a replacement step about where the good arrays are."""
        if self.variation is None:
            return None
        rec = next(r for r in self._entries if r.name == name)
        t = rec.tensor
        n_in, n_out = t.shape[-1], t.shape[-2]
        M = t.numel() // (n_in * n_out)
        gen = torch.Generator(device=t.device)
        gen.manual_seed(tensor_seed(seed, name + "\x00arrays"))
        return self._draw_arrays(gen, M, n_out, n_in, t.device)

    def _draw_arrays(self, gen, M, n_out, n_in, device):
        v = self.variation
        no, _ = _arrays(n_out, None if self.tile is None else self.tile[1])
        nt, _ = _arrays(n_in, None if self.tile is None else self.tile[0])
        shape = (M, no, nt)
        z = torch.randn((3,) + shape, generator=gen, device=device, dtype=torch.float32)
        return {"sigma_mult": z[0].mul(v.sigma_spread).exp_(), "gain": z[1].mul(v.gain_std).add_(1.0),
                "offset": z[2].mul(v.offset_std)}

    def _add_noise_(self, t: torch.Tensor, gen: torch.Generator, agen, scales, t_inf: float, comp: bool):
        shape = t.shape
        n_in, n_out = shape[-1], shape[-2]
        M = t.numel() // (n_in * n_out)
        arrays = None if agen is None else self._draw_arrays(agen, M, n_out, n_in, t.device)
        view = t.view(M, n_out, n_in) if t.is_contiguous() else None
        src = view if view is not None else t.detach().reshape(M, n_out, n_in)
        chunk = CPU_CHUNK_ELEMENTS if t.device.type == "cpu" else CHUNK_ELEMENTS
        per = max(1, chunk // (n_in * n_out))  # whole matrices per chunk (bounds memory)
        outs, wscales = [], []
        for m0 in range(0, M, per):
            arr = None if arrays is None else {k: v[m0:m0 + per] for k, v in arrays.items()}
            out, wscale = self._noisy_block(src[m0:m0 + per], gen, agen, arr, scales, t_inf, comp)
            wscales.append(wscale)
            if view is not None:
                view[m0:m0 + per].copy_(out)
            else:
                outs.append(out.to(t.dtype))
        if view is None:
            t.copy_(torch.cat(outs).reshape(shape))
        return torch.cat(wscales)

    def _noisy_block(self, w_in: torch.Tensor, gen: torch.Generator, agen, arrays, scales, t_inf: float,
                     comp: bool):
        """Noisy float32 copy of a block of whole matrices [m, out, in], and alpha * w_max [m, out, nt]."""
        nm = self.noise_model
        prog_scale, read_scale, drift_scale = scales
        g_max = float(nm.g_max)
        m, n_out, n_in = w_in.shape
        nt, R = _arrays(n_in, None if self.tile is None else self.tile[0])
        no, C = _arrays(n_out, None if self.tile is None else self.tile[1])
        w = w_in.to(torch.float32, copy=True)
        padded = nt * R != n_in or no * C != n_out
        if padded:
            w = F.pad(w, (0, nt * R - n_in, 0, no * C - n_out))
        w = w.view(m, no, C, nt, R)
        dims = (-1,) if self.weight_scaling == "row" else (2, 4)
        w_max = w.abs().amax(dim=dims, keepdim=True)  # row: [m, no, C, nt, 1]; tile: [m, no, 1, nt, 1]
        if self.range_crest is not None:  # full scale at max(abs-max, crest * rms): the headroom of heavy tails
            n_valid = torch.zeros((1, no * C, 1, nt * R), dtype=torch.float32, device=w.device)
            n_valid[:, :n_out, :, :n_in] = 1.0
            n_valid = n_valid.view(1, no, C, nt, R).sum(dim=dims, keepdim=True).clamp_(min=1)
            rms = numerics.sqrt(w.square().sum(dim=dims, keepdim=True).div_(n_valid))  # vendor-independent
            w_max = torch.maximum(w_max, rms.mul_(self.range_crest))
        k = torch.where(w_max > 0, g_max / w_max, torch.zeros_like(w_max))

        # Every random number first, in the order the chain uses them: programming, drift exponent and
        # read noise for both devices of the pair (one generator), then the stuck devices (the arrays').
        n_draws = 1 + nm.has_drift + nm.has_read_noise
        # On a CPU, drawn into one buffer kept across blocks and passes (at most 6 x 2^20 floats for
        # blocks of whole matrices up to 2^20 weights): a fresh one is allocated and page-faulted on
        # every block, about a third of the time of drawing its normals. (CUDA's caching allocator
        # already reuses its memory, and a kept buffer would stay allocated through the forward.)
        need = n_draws * 2 * w.numel()
        if w.device.type == "cpu":
            buf = self._normals.get(w.device)
            if buf is None or buf.numel() < need:
                buf = self._normals[w.device] = torch.empty(need, dtype=torch.float32, device=w.device)
            z = buf[:need].view((n_draws, 2) + w.shape)
        else:
            z = torch.empty((n_draws, 2) + w.shape, dtype=torch.float32, device=w.device)
        for i in range(n_draws):
            torch.randn(z.shape[1:], generator=gen, out=z[i])
        stuck = None
        if arrays is not None and self.variation.stuck_frac > 0:
            stuck = torch.rand(z.shape[1:], generator=agen, device=w.device, dtype=torch.float32)
        mult = None if arrays is None else arrays["sigma_mult"].view(1, m, no, 1, nt, 1)
        c = self._curves  # the curves, built once per noise model, read time and device
        if c is None or c[0] is not nm or c[1:3] != (t_inf, w.device):
            c = self._curves = (nm, t_inf, w.device, nm.curves(t_inf, torch.float32, w.device))
        curves = c[3]
        log_decay = math.log(nm.t0 / t_inf) if nm.has_drift and t_inf > nm.t0 else None
        drifted = log_decay is not None or nm.has_read_noise
        gain_offset = arrays is not None and bool(self.variation.gain_std or self.variation.offset_std)
        chain = device_chain if curves["exact"] else device_chain.fn  # compiled only where it gives the eager bytes
        out, w_prog = chain(w, k, z, mult, stuck, curves, None if self.levels is None else (self.levels - 1) / g_max,
                            bool(nm.clip_at_zero), prog_scale, read_scale, drift_scale, log_decay,
                            0.0 if stuck is None else self.variation.stuck_frac, g_max, comp and drifted, not gain_offset)
        del w, z, stuck
        if padded:  # devices outside the matrix do not exist: out of the readouts
            valid = torch.zeros((1, no * C, 1, nt * R), dtype=torch.bool, device=out.device)
            valid[:, :n_out, :, :n_in] = True
            valid = valid.view(1, no, C, nt, R)
            out.masked_fill_(~valid, 0.0)
            if w_prog is not None:
                w_prog.masked_fill_(~valid, 0.0)
        if gain_offset:
            gain = arrays["gain"].view(m, no, 1, nt, 1)
            off = arrays["offset"].view(m, no, 1, nt, 1) * g_max
            out.mul_(gain).add_(off)
            if w_prog is not None:
                w_prog.mul_(gain).add_(off)
            if padded:
                out.masked_fill_(~valid, 0.0)
                if w_prog is not None:
                    w_prog.masked_fill_(~valid, 0.0)
        wscale = w_max  # alpha * w_max per (row or array): the weight of a normalised array output of 1
        if w_prog is not None:  # drift compensation: differential readout of eye through the array
            num = (w_prog.abs_() if gain_offset else w_prog).sum(dim=(2, 4), keepdim=True, dtype=torch.float64)
            den = out.abs().sum(dim=(2, 4), keepdim=True, dtype=torch.float64)
            alpha = torch.where(den > 0, num / den, torch.ones_like(den)).to(torch.float32)  # [m, no, 1, nt, 1]
            wscale = wscale.mul_(alpha)
            del w_prog
        out.mul_(wscale * (1.0 / g_max))
        out = out.reshape(m, no * C, nt * R)[:, :n_out, :n_in]
        ws = wscale.expand(m, no, C, nt, 1).reshape(m, no * C, nt)[:, :n_out].contiguous()
        return out, ws
