"""Weights on analog CIM arrays: map to conductances, add device noise in place, restore exactly.

This is the converter half (as aihwkit's conductance converters); the device physics is a
romer.cim.noise_models.NoiseModel. The mapping (DESIGN.md, "Mapping weights to CIM"):

- Every tensor's last dim is the input dim; every leading index is an output row, so a fused
  expert tensor [E, out, in] is E*out rows and a Linear weight [out, in] is out rows.
- Each row is scaled by its abs-max w_max, or per crossbar tile of `tile_rows` inputs when
  tile_rows is set (the row is cut into chunks of tile_rows inputs, each with its own w_max).
- Differential pair: G+ = max(w,0)/w_max*g_max, G- = max(-w,0)/w_max*g_max, optionally
  quantised to `levels` evenly spaced conductances in [0, g_max] (0 and g_max included).
- Both devices get independent noise: programming noise; then, at t = t_inference_s, drift
  g*(t/t0)^(-nu) (t > t0 only) and read noise, where the model has them; each sigma (programming,
  nu spread, read) times `scale`, never the mean drift. Conductances are clipped at 0 when the
  model says so (physical devices; not for the 'gaussian' preset).
- Global drift compensation (this project's version of aihwkit's GlobalDriftCompensation): per
  weight matrix (each [out, in] slice; each [out, tile_rows] block with tiles) the output is
  rescaled by alpha = sum(G programmed) / sum(G at t_inference), over both devices of all pairs,
  i.e. so that the mean absolute conductance matches the programmed one. It models a digital
  per-tile scale calibrated with a known input; switch it off with drift_compensation=False.
- w' = alpha * (G+ - G-) / g_max * w_max.

Noise is applied in place under a generator seeded from (seed, tensor name), on the tensor's
device, so a tensor's noise does not depend on which other tensors are analog. The same seed,
device and shapes give bit-identical weights. The clean weights are kept once, on the CPU (pinned
when the tensor is on CUDA); the model is never deep-copied.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from romer.cim.noise_models import NoiseModel
from romer.core.records import AnalogTensor

CHUNK_ELEMENTS = 1 << 26  # weights per block: fused tensors go through in blocks of whole matrices


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor generator seed derived from (seed, name); stable across runs and processes."""
    h = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


class AnalogWeights:
    """A set of weight tensors that live on simulated analog arrays.

    tensors: AnalogTensor records. Their tensors are modified in place by apply() and restore();
    a clean copy of each is kept on the CPU.
    """

    def __init__(self, tensors: Iterable[AnalogTensor], noise_model: NoiseModel, tile_rows: Optional[int] = None,
                 levels: Optional[int] = None):
        if tile_rows is not None and int(tile_rows) < 1:
            raise ValueError(f"tile_rows must be >= 1, got {tile_rows}")
        if levels is not None and int(levels) < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.noise_model = noise_model
        self.tile_rows = None if tile_rows is None else int(tile_rows)
        self.levels = None if levels is None else int(levels)
        self._entries = []
        self._clean = {}
        self._where = {}  # (kind, layer, part, expert) -> name
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

    # ------------------------------------------------------------------ noise
    @torch.no_grad()
    def apply(self, seed: int, scale: float = 1.0, t_inference_s: float = 25.0,
              drift_compensation: bool = True, edit: Optional[Callable] = None,
              kinds: Optional[Iterable[str]] = None):
        """Copy the clean weights in, call edit(record) if given (it may rewrite record.tensor in
        place, e.g. program a replica), then add noise in place.

        kinds: if given, only tensors of these kinds get noise; the others stay clean (after edit).
        """
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"noise scale must be finite and >= 0, got {scale}")
        if not (t_inference_s > 0 and math.isfinite(t_inference_s)):
            raise ValueError(f"t_inference_s must be finite and > 0, got {t_inference_s}")
        kinds = None if kinds is None else set(kinds)
        for rec in self._entries:
            t = rec.tensor
            t.copy_(self._clean[rec.name], non_blocking=True)
            if edit is not None:
                edit(rec)
            if kinds is None or rec.kind in kinds:
                gen = torch.Generator(device=t.device)
                gen.manual_seed(tensor_seed(seed, rec.name))
                self._add_noise_(t, gen, float(scale), float(t_inference_s), bool(drift_compensation))

    @torch.no_grad()
    def restore(self):
        """Copy the clean weights back (exact)."""
        for rec in self._entries:
            rec.tensor.copy_(self._clean[rec.name], non_blocking=True)

    @contextmanager
    def noisy(self, seed: int, **kw):
        """`with aw.noisy(seed, scale=...):` noisy weights inside, clean weights after."""
        self.apply(seed, **kw)
        try:
            yield self
        finally:
            self.restore()

    def _add_noise_(self, t: torch.Tensor, gen: torch.Generator, scale: float, t_inf: float, comp: bool):
        shape = t.shape
        n_in, n_out = shape[-1], shape[-2]
        M = t.numel() // (n_in * n_out)
        view = t.view(M, n_out, n_in) if t.is_contiguous() else None
        src = view if view is not None else t.detach().reshape(M, n_out, n_in)
        per = max(1, CHUNK_ELEMENTS // (n_in * n_out))  # whole matrices per chunk (bounds memory)
        if per >= M:
            out = self._noisy_block(src, gen, scale, t_inf, comp)
            t.copy_(out.reshape(shape))
            return
        outs = []
        for m0 in range(0, M, per):
            out = self._noisy_block(src[m0:m0 + per], gen, scale, t_inf, comp)
            if view is not None:
                view[m0:m0 + per].copy_(out)
            else:
                outs.append(out.to(t.dtype))
        if view is None:
            t.copy_(torch.cat(outs).reshape(shape))

    def _noisy_block(self, w_in: torch.Tensor, gen: torch.Generator, scale: float, t_inf: float, comp: bool):
        """Noisy float32 copy of a block of whole matrices [m, out, in]."""
        nm = self.noise_model
        g_max = float(nm.g_max)
        m, n_out, n_in = w_in.shape
        T = self.tile_rows or n_in
        nt = -(-n_in // T)
        w = w_in.to(torch.float32, copy=True)
        if nt * T != n_in:
            w = F.pad(w, (0, nt * T - n_in))
        w = w.view(m, n_out, nt, T)
        lo, hi = torch.aminmax(w, dim=-1, keepdim=True)
        w_max = torch.maximum(hi, lo.neg_())  # [m, out, nt, 1]
        k = torch.where(w_max > 0, g_max / w_max, torch.zeros_like(w_max))

        # target conductances of the pair, stacked: g[0] = G+, g[1] = G-
        g = torch.empty((2,) + w.shape, dtype=torch.float32, device=w.device)
        torch.clamp(w, min=0, out=g[0])
        torch.clamp(w.neg_(), min=0, out=g[1])
        del w
        g.mul_(k)
        if self.levels is not None:
            q = (self.levels - 1) / g_max
            g.mul_(q).round_().div_(q)

        def randn():
            return torch.randn(g.shape, generator=gen, device=g.device, dtype=torch.float32)

        # programming noise
        g_prog = torch.addcmul(g, randn(), nm.prog_sigma(g), value=scale)
        if nm.clip_at_zero:
            g_prog.clamp_(min=0)
        g_now = g_prog
        drifted = False
        if nm.has_drift:
            mean, std = nm.drift_nu(g)
            nu = torch.addcmul(mean, randn(), std, value=scale)
            del mean, std
            if t_inf > nm.t0:
                drifted = True
                g_now = torch.pow(nm.t0 / t_inf, nu, out=nu).mul_(g_prog)  # g_prog * (t/t0)^(-nu)
            del nu
        if nm.has_read_noise:
            g_now = torch.addcmul(g_now, randn(), nm.read_sigma(g, t_inf), value=scale)
            if nm.clip_at_zero:
                g_now.clamp_(min=0)
        del g
        alpha = None
        if comp and drifted:
            dims = (0, 2, 4)  # both devices, all rows, all inputs of a tile
            num = g_prog.sum(dim=dims, keepdim=True, dtype=torch.float64)
            den = g_now.sum(dim=dims, keepdim=True, dtype=torch.float64)
            alpha = torch.where(den > 0, num / den, torch.ones_like(den)).to(torch.float32)[0]  # [m,1,nt,1]
        del g_prog
        out = g_now[0].sub_(g_now[1])
        out.mul_(w_max.mul_(1.0 / g_max) if alpha is None else w_max.mul_(alpha).mul_(1.0 / g_max))
        return out.reshape(m, n_out, nt * T)[..., :n_in]
