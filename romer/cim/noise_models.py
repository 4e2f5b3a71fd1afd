"""Device noise models: programming noise, drift and read noise as functions of conductance.

This module is the device physics only (as aihwkit's noise models); mapping weights to
conductances lives in romer.cim.mapping (as aihwkit's converters). Every function takes and returns
conductances in uS as torch tensors.

A NoiseModel is built from a literature preset (PRESETS, `romer presets`) or fitted from chip
measurement CSVs (romer.cim.noise_fit). Its JSON (`to_json`) carries the curves tabulated on a
grid of conductances, whatever the parametric form, plus the parametric form itself;
`from_json` rebuilds the exact model.

Conventions (this project's choices, documented in docs/noise.md):
- `prog_sigma(g)`: std of the programmed conductance of a device with target g.
- `drift_nu(g)`: mean and std of the drift exponent nu in g(t) = g_prog * (t/t0)^(-nu), t > t0, at
  target conductance g; no drift before t0. As in aihwkit, nu = |mean + std z| (folded at 0) and
  `drift_scale` multiplies nu itself (romer.cim.mapping).
- `read_sigma(g_prog, t, g_now)`: std of one read at time t of a device in programmed state g_prog
  (read noise depends on the device's actual state, as aihwkit evaluates it: a device programmed to
  0 whose programmed state is 0 has no read noise). The PCM law is multiplicative in the drifted
  conductance g_now; a fitted table is evaluated at g_prog.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

# torch is imported inside the functions that use it: fitting a noise model (`romer fit-noise`) needs
# only numpy, and importing torch costs ~1 s and ~200 MB, as much as a million-row CSV.

from romer.core.errors import UserError

FORMAT = "romer-noise-model/1"
GRID_POINTS = 101
TABLE_TIMES_S = (1.0, 20.0, 25.0, 3600.0, 86400.0, 2.592e6, 3.1536e7)
GAUSSIAN_DEFAULT_FRACTION = 0.05


# ----------------------------------------------------------------------------- curve helpers

def poly_eval(coeffs, x):
    """sum_k coeffs[k] * x**k (Horner), x a tensor."""
    import torch
    if len(coeffs) == 1:
        return torch.full_like(x, float(coeffs[0]))
    out = x * float(coeffs[-1])
    out.add_(float(coeffs[-2]))
    for c in reversed(coeffs[:-2]):
        out.mul_(x).add_(float(c))
    return out


def _uniform_step(xp: np.ndarray) -> Optional[float]:
    """The grid step if xp is uniformly spaced (the fitted and preset tables are), else None."""
    d = np.diff(xp)
    return float(d[0]) if d.size and d[0] > 0 and np.allclose(d, d[0], rtol=1e-9, atol=0) else None


def uniform_grid(xp, fp, dtype, device) -> Optional[tuple]:
    """A piecewise-linear curve on a uniform grid as `interp_grid` reads it: (x0, 1/step, n, f0, df),
    f0 and df [n - 1] tensors; None when the grid is not uniform or has one point."""
    import torch
    xp_np = np.asarray(xp, dtype=np.float64).reshape(-1)
    fp_np = np.asarray(fp, dtype=np.float64).reshape(-1)
    step = _uniform_step(xp_np) if xp_np.size > 1 else None
    if step is None:
        return None
    opts = {"dtype": dtype, "device": device}
    return (float(xp_np[0]), 1.0 / step, int(xp_np.size), torch.as_tensor(fp_np[:-1], **opts),
            torch.as_tensor(np.diff(fp_np), **opts))


def mul_add(a, b, c):
    """a * b + c, rounded after the multiply and after the add, eagerly and compiled alike.

    Not torch.addcmul: eagerly (CPU and CUDA) that is a fused multiply-add, one rounding, which
    compiled CPU code writes as a multiply and an add (2% of float32 results then differ by an ulp),
    and an exact emulation of it there made the noise pass twice as slow."""
    return a * b + c


_LN2_HI = 0.693145751953125  # ln 2 split (Cody and Waite): k * _LN2_HI is exact for |k| < 2^11
_LN2_LO = 1.4286068203094172e-06
_EXP_TAYLOR = [1.0 / math.factorial(n) for n in range(8)]  # degree 7: truncation < 6e-9 relative on |r| <= ln2 / 2


def exp(y):
    """exp of a float32 tensor in plain arithmetic (round, multiply, add, an exponent-field shift): the
    same bytes eagerly and compiled, on any CPU. The noise pass's drift factor (romer.cim.mapping).

    torch's own exp is MKL's when eager and SLEEF's when compiled, and its pow is SLEEF's or libm's
    by where the element falls in the loop; either differs in the last bit between the paths. This one
    is within 2 float32 ulps of the exact value (tests/test_cim.py). Inputs below -87 give
    exp(-87) ~ 1.6e-38 instead of a subnormal."""
    import torch

    y = y.clamp(min=-87.0)
    k = torch.round(y * (1.0 / math.log(2.0)))
    r = (y - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln2 / 2 (plus rounding)
    p = r * _EXP_TAYLOR[-1] + _EXP_TAYLOR[-2]
    for c in reversed(_EXP_TAYLOR[:-2]):
        p = p * r + c
    two_k = ((k.to(torch.int32) + 127) << 23).view(torch.float32)  # 2^k, exact
    return p * two_k


def interp_grid(x, grid):
    """`interp` on a uniform grid (from `uniform_grid`), in plain torch ops: also what the compiled
    noise pass runs (romer.cim.mapping), with the same bytes."""
    import torch

    x0, inv_step, n, f0, df = grid
    u = (x - x0).mul_(inv_step).clamp_(0, n - 1)  # position in grid steps
    idx = u.to(torch.int64).clamp_(max=n - 2)
    w = u.sub_(idx)  # in [0, 1]
    flat = idx.view(-1)
    return w.mul_(df.take(flat).view_as(x)).add_(f0.take(flat).view_as(x))  # two roundings: see mul_add


def interp(x: torch.Tensor, xp, fp) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, held constant beyond the ends (torch).

    On a uniform grid the segment index is arithmetic instead of a searchsorted, and each value is
    two gathers from a 100-entry table and one multiply-add: on a 2-core CPU this made the noise
    pass of the builtin model 3x faster (searchsorted and advanced indexing were 70% of it).
    """
    import torch
    xp_np = np.asarray(xp, dtype=np.float64).reshape(-1)
    fp_np = np.asarray(fp, dtype=np.float64).reshape(-1)
    if xp_np.size == 1:
        return torch.full_like(x, float(fp_np[0]))
    grid = uniform_grid(xp_np, fp_np, x.dtype, x.device)
    if grid is not None:
        return interp_grid(x, grid)
    opts = {"dtype": x.dtype, "device": x.device}
    xp_t = torch.as_tensor(xp_np, **opts)
    fp_t = torch.as_tensor(fp_np, **opts)
    idx = torch.searchsorted(xp_t, x.contiguous()).clamp(1, xp_t.numel() - 1)
    x0, x1 = xp_t[idx - 1], xp_t[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    f0 = fp_t[idx - 1]
    return f0 + w * (fp_t[idx] - f0)


def pcm_read_q(g, g_max: float):
    """The PCM read-noise law's Q_s = min(0.0088 / x^0.65, 0.2), x = |g_prog| / g_max (the clamp at
    1e-3 g_max is below the cap's reach)."""
    return g.abs().clamp_min(1e-3 * g_max).pow_(-0.65).mul_(0.0088 * g_max**0.65).clamp_max_(0.2)


def _curve(x, curve):
    kind, c = curve
    return interp_grid(x, c) if kind == "grid" else interp(x, *c)


def sigma_prog(g, curve):
    """Programming-noise sigma at target g, from NoiseModel.curves()["prog"]."""
    kind, c = curve
    return (poly_eval(c, g) if kind == "poly" else _curve(g, curve)).clamp_min(0)


def nu_mean_std(g, curve):
    """(mean, std) of the drift exponent at target g, from NoiseModel.curves()["drift"]."""
    kind, c = curve
    if kind == "pcm":
        x = (g / c).abs().clamp_min(1e-7).log()
        return (-0.0155 * x + 0.0244).clamp(0.049, 0.1), (-0.0125 * x - 0.0059).clamp(0.008, 0.045)
    return _curve(g, c[0]), _curve(g, c[1]).clamp_min(0)


def sigma_read(g_prog, g_now, curve):
    """Read-noise sigma of a device programmed to g_prog, now at g_now, from NoiseModel.curves()["read"]."""
    kind, c = curve
    if kind == "pcm":
        g_max, time_factor = c
        return pcm_read_q(g_prog, g_max).mul_(g_now.abs()).mul_(time_factor)
    return _curve(g_prog, curve).clamp_min(0)


def _interp_rows_log_t(times, table, t):
    """Interpolate a [n_t, n_g] table linearly in log t at scalar t (clamped) -> [n_g]."""
    times = np.asarray(times, dtype=np.float64)
    table = np.asarray(table, dtype=np.float64)
    if len(times) == 1:
        return table[0]
    lt = np.log(times)
    x = np.clip(math.log(t), lt[0], lt[-1])
    j = int(np.clip(np.searchsorted(lt, x), 1, len(lt) - 1))
    w = (x - lt[j - 1]) / (lt[j] - lt[j - 1])
    return table[j - 1] + w * (table[j] - table[j - 1])


def _fl(a):
    return [float(round(float(v), 8)) for v in np.asarray(a).reshape(-1)]


# ----------------------------------------------------------------------------- the model

@dataclass
class NoiseModel:
    """Conductance-level noise law. Build with a preset, `from_json`, or romer.cim.noise_fit.

    prog_coeffs: sigma_prog = sum c_k (g/g_max)^k uS; or prog_table (g_uS, sigma_uS) when absent.
    drift: None, {"law": "pcm"} or {"law": "table", "g_uS", "mean", "std"}; t0: its reference time.
    read: None, {"law": "pcm", "t_read_s"} or {"law": "table", "g_uS", "t_s", "sigma_uS" [n_t][n_g]}.
    """

    name: str
    kind: str  # "preset" | "fitted" | "json"
    g_max: float
    prog_coeffs: Optional[list] = None
    prog_table: Optional[tuple] = None
    clip_at_zero: bool = True
    drift: Optional[dict] = None
    t0: Optional[float] = None
    read: Optional[dict] = None
    description: str = ""
    citation: str = ""
    source: str = ""
    preset: Optional[dict] = None  # {"name": ..., ...args} for presets
    extra: Optional[dict] = None  # fitted: the full fit JSON (levels, R², ...)

    # --- the laws, as curves: what the noise pass (romer.cim.mapping) evaluates, compiled or eagerly
    def curves(self, t_s: Optional[float], dtype, device, parts=("prog", "drift", "read")) -> dict:
        """{"prog", "drift", "read"}: each law as a (kind, data) pair of plain tensors and numbers,
        built outside any compiled code, for `sigma_prog`, `nu_mean_std` and `sigma_read` (read:
        at read time t_s; None: no read curve); only the laws in `parts` are built (the others are
        None). "exact": whether compiled code evaluates the built ones with
        the eager bytes: not for a table on a non-uniform grid (searchsorted), nor for the PCM drift
        law (its log is MKL's when eager and SLEEF's when compiled; they differ in the last bit), nor
        for the PCM read law (a pow: SLEEF's or libm's, by where the element falls in the loop)."""
        exact = True

        def table(xp, fp):
            nonlocal exact
            grid = uniform_grid(xp, fp, dtype, device)
            if grid is None:
                exact = False
                return ("table", (xp, fp))
            return ("grid", grid)

        prog = drift = read = None
        if "prog" in parts:
            prog = ("poly", tuple(self.prog_poly_g())) if self.prog_coeffs is not None else table(*self.prog_table)
        if self.drift is not None and "drift" in parts:
            if self.drift["law"] == "pcm":
                exact = False
                drift = ("pcm", float(self.g_max))
            else:
                drift = ("tables", (table(self.drift["g_uS"], self.drift["mean"]),
                                    table(self.drift["g_uS"], self.drift["std"])))
        if self.read is not None and t_s is not None and "read" in parts:
            if self.read["law"] == "pcm":
                exact = False  # its pow(-0.65), as the drift factor (romer.cim.mapping)
                t_read = self.read.get("t_read_s", 250e-9)
                read = ("pcm", (float(self.g_max), math.sqrt(math.log((t_s + t_read) / (2 * t_read)))))
            else:
                read = table(self.read["g_uS"], _interp_rows_log_t(self.read["t_s"], self.read["sigma_uS"], t_s))
        return {"prog": prog, "drift": drift, "read": read, "exact": exact}

    def prog_poly_g(self) -> list:
        """The programming-sigma polynomial in powers of g (not g/g_max): one pass fewer."""
        return [c / self.g_max**k for k, c in enumerate(self.prog_coeffs)]

    # --- programming noise
    def prog_sigma(self, g: torch.Tensor) -> torch.Tensor:
        return sigma_prog(g, self.curves(None, g.dtype, g.device, ("prog",))["prog"])

    # --- drift
    @property
    def has_drift(self) -> bool:
        return self.drift is not None

    def drift_nu(self, g: torch.Tensor):
        """(mean, std) of the drift exponent nu at target conductance g."""
        import torch
        if self.drift is None:
            z = torch.zeros_like(g)
            return z, z
        return nu_mean_std(g, self.curves(None, g.dtype, g.device, ("drift",))["drift"])

    # --- read noise
    @property
    def has_read_noise(self) -> bool:
        return self.read is not None

    def read_sigma(self, g: torch.Tensor, t_s: float, g_now: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Std (uS) of one read at time t_s (s since programming) of a device in programmed state g.

        g_now: the drifted conductance at t_s (PCM law: sigma = |g_now| Q_s(g) sqrt(ln(...)), as
        aihwkit's PCMLikeNoiseModel); None: g drifted by the mean nu.
        """
        import torch
        if self.read is None:
            return torch.zeros_like(g)
        if g_now is None:
            g_now = g
            if self.read["law"] == "pcm" and self.has_drift and t_s > self.t0:
                g_now = g * torch.pow(self.t0 / t_s, self.drift_nu(g)[0])
        return sigma_read(g, g_now, self.curves(t_s, g.dtype, g.device, ("read",))["read"])

    # --- JSON
    def grid(self):
        return np.linspace(0.0, self.g_max, GRID_POINTS)

    def to_json(self) -> dict:
        import torch
        if self.extra is not None:
            return json.loads(json.dumps(self.extra))
        g = torch.tensor(self.grid(), dtype=torch.float64)
        out = {
            "format": FORMAT,
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "citation": self.citation,
            "source": self.source or self.name,
            "preset": self.preset,
            "g_max_uS": float(self.g_max),
            "clip_at_zero": self.clip_at_zero,
            "programming_sigma_uS": {"g_uS": _fl(g), "sigma_uS": _fl(self.prog_sigma(g))},
            "programming_sigma_poly": (
                {"form": "sigma_uS = sum_k coeffs_uS[k] * (g/g_max)^k", "degree": len(self.prog_coeffs) - 1,
                 "coeffs_uS": [float(c) for c in self.prog_coeffs]} if self.prog_coeffs is not None else None),
            "drift_nu": None,
            "read_noise": None,
        }
        if self.has_drift:
            mean, std = self.drift_nu(g)
            out["drift_nu"] = {"g_uS": _fl(g), "mean": _fl(mean), "std": _fl(std), "t0_s": float(self.t0),
                               "law": self.drift["law"]}
        if self.has_read_noise:
            if self.read["law"] == "table":
                out["read_noise"] = {"law": "table", "g_uS": _fl(self.read["g_uS"]), "t_s": _fl(self.read["t_s"]),
                                     "sigma_uS": [_fl(r) for r in self.read["sigma_uS"]]}
            else:
                times = [t for t in TABLE_TIMES_S if t >= (self.t0 or 0)]
                out["read_noise"] = {"law": self.read["law"], "t_read_s": self.read.get("t_read_s"),
                                     "g_uS": _fl(g), "t_s": _fl(times),
                                     "sigma_uS": [_fl(self.read_sigma(g, t)) for t in times]}
        return out

    @classmethod
    def from_json(cls, d: dict, where: str = "noise model JSON") -> "NoiseModel":
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a JSON object")
        if d.get("preset"):
            p = dict(d["preset"])
            name = p.pop("name", None)
            if name not in PRESETS:
                raise UserError(f"{where}: key 'preset.name': unknown preset {name!r}; known: {list(PRESETS)}")
            return PRESETS[name].build(**p)

        def need(obj, key, path):
            if not isinstance(obj, dict) or key not in obj or obj[key] is None:
                raise UserError(f"{where}: missing key '{path}'")
            return obj[key]

        g_max = float(need(d, "g_max_uS", "g_max_uS"))
        if not g_max > 0:
            raise UserError(f"{where}: key 'g_max_uS' must be > 0, got {g_max}")
        poly = d.get("programming_sigma_poly")
        coeffs = table = None
        if poly and poly.get("coeffs_uS"):
            coeffs = [float(c) for c in poly["coeffs_uS"]]
        else:
            ps = need(d, "programming_sigma_uS", "programming_sigma_uS")
            table = (need(ps, "g_uS", "programming_sigma_uS.g_uS"), need(ps, "sigma_uS", "programming_sigma_uS.sigma_uS"))
        drift = t0 = None
        dn = d.get("drift_nu")
        if dn:
            drift = {"law": "table", "g_uS": need(dn, "g_uS", "drift_nu.g_uS"),
                     "mean": need(dn, "mean", "drift_nu.mean"), "std": need(dn, "std", "drift_nu.std")}
            t0 = float(need(dn, "t0_s", "drift_nu.t0_s"))
        read = None
        rn = d.get("read_noise")
        if rn:
            read = {"law": "table", "g_uS": need(rn, "g_uS", "read_noise.g_uS"),
                    "t_s": need(rn, "t_s", "read_noise.t_s"), "sigma_uS": need(rn, "sigma_uS", "read_noise.sigma_uS")}
            if t0 is None:
                t0 = float(min(read["t_s"]))
        return cls(name=d.get("name", "custom"), kind=d.get("kind", "json"), g_max=g_max, prog_coeffs=coeffs,
                   prog_table=table, clip_at_zero=bool(d.get("clip_at_zero", True)), drift=drift, t0=t0, read=read,
                   description=d.get("description", ""), citation=d.get("citation", ""),
                   source=d.get("source", ""), extra=d)

    def summary(self) -> dict:
        """Small numeric summary for metrics/noise_fit.json."""
        import torch
        j = self.to_json()
        g = torch.tensor([0.25 * self.g_max, 0.5 * self.g_max, self.g_max], dtype=torch.float64)
        s = {
            "source": j.get("source", self.source),
            "name": self.name,
            "kind": self.kind,
            "g_max_uS": float(self.g_max),
            "programming_sigma_uS_at": {f"{k}g_max": round(float(v), 6)
                                        for k, v in zip(("0.25", "0.5", "1.0"), self.prog_sigma(g))},
            "coefficients_uS": j["programming_sigma_poly"]["coeffs_uS"] if j.get("programming_sigma_poly") else None,
        }
        fit = j.get("fit") or {}
        if fit:
            s.update({k: fit[k] for k in ("degree", "r2", "r2_unweighted", "rmse_rel", "n_levels", "n_devices",
                                         "n_rows", "binned", "includes_read_noise") if k in fit})
        s["drift"] = None
        if self.has_drift:
            mean, std = self.drift_nu(g)
            s["drift"] = {"t0_s": float(self.t0),
                          "nu_mean_at": {f"{k}g_max": round(float(v), 6) for k, v in zip(("0.25", "0.5", "1.0"), mean)},
                          "nu_std_at": {f"{k}g_max": round(float(v), 6) for k, v in zip(("0.25", "0.5", "1.0"), std)}}
            if j.get("drift_fit"):
                s["drift"]["method"] = j["drift_fit"].get("method")
        s["read_noise"] = None
        if self.has_read_noise:
            t_ref = float(j["read_noise"]["t_s"][0]) if j.get("read_noise") else float(self.t0 or 1.0)
            s["read_noise"] = {"t_s": t_ref,
                               "sigma_uS_at": {f"{k}g_max": round(float(v), 6)
                                               for k, v in zip(("0.25", "0.5", "1.0"), self.read_sigma(g, t_ref))}}
        return s


# ----------------------------------------------------------------------------- presets

PCM_COEFFS = (0.26348, 1.9650, -1.1731)
WAN_G_MAX = 39.26
WAN_COEFFS_G = (1.053, 0.2374, -1.167e-2, 1.536e-4)  # in powers of G (uS)
MILO_G_MAX = 225.0
MILO_COEFFS_G = (4.782321, -0.009107)


def _in_x(coeffs_g, g_max):
    """Polynomial coefficients in G (uS) -> in x = G/g_max."""
    return [c * g_max**k for k, c in enumerate(coeffs_g)]


def pcm_joshi2020() -> NoiseModel:
    return NoiseModel(
        name="pcm-joshi2020", kind="preset", g_max=25.0, prog_coeffs=list(PCM_COEFFS), clip_at_zero=True,
        drift={"law": "pcm"}, t0=20.0, read={"law": "pcm", "t_read_s": 250e-9},
        description="PCM: programming noise, drift and 1/f read noise (aihwkit PCMLikeNoiseModel)",
        citation="Nandakumar et al., ICECS 2019; Joshi et al., Nat. Commun. 11:2473 (2020); IBM aihwkit PCMLikeNoiseModel",
        preset={"name": "pcm-joshi2020"})


def reram_wan2022() -> NoiseModel:
    return NoiseModel(
        name="reram-wan2022", kind="preset", g_max=WAN_G_MAX, prog_coeffs=_in_x(WAN_COEFFS_G, WAN_G_MAX),
        description="ReRAM (NeuRRAM) programming noise at t = 1 s; no drift or read-noise term",
        citation="Wan et al., Nature 608:504 (2022) (NeuRRAM); Sandia CrossSim RRAM_Wan",
        preset={"name": "reram-wan2022"})


def reram_milo2021() -> NoiseModel:
    return NoiseModel(
        name="reram-milo2021", kind="preset", g_max=MILO_G_MAX, prog_coeffs=_in_x(MILO_COEFFS_G, MILO_G_MAX),
        description="ReRAM programming noise, linear in G; no drift or read-noise term",
        citation="Milo et al., IRPS 2021; Sandia CrossSim",
        preset={"name": "reram-milo2021"})


def gaussian(fraction: float = GAUSSIAN_DEFAULT_FRACTION, g_max: float = 25.0) -> NoiseModel:
    """Generic model: additive weight noise with std = fraction * (row's |w|max).

    Realised as independent N(0, (fraction * g_max / sqrt 2)^2) on both devices of the
    differential pair, constant in g and not clipped at 0, so that w' - w has std exactly
    fraction * w_max for every weight (zeros included). g_max is immaterial.
    """
    fraction = float(fraction)
    if not (fraction >= 0 and math.isfinite(fraction)):
        raise UserError(f"gaussian noise fraction must be a finite number >= 0, got {fraction}")
    return NoiseModel(
        name=f"gaussian:{fraction:g}", kind="preset", g_max=g_max,
        prog_coeffs=[fraction * g_max / math.sqrt(2)], clip_at_zero=False,
        description=(f"generic Gaussian weight noise: w' = w + N(0, ({fraction:g} * w_max)^2), w_max the row's "
                     "(per tile) abs-max"),
        citation="generic additive Gaussian weight-noise model of the CIM literature (e.g. Joshi et al. 2020)",
        preset={"name": "gaussian", "fraction": fraction, "g_max": g_max})


@dataclass(frozen=True)
class Preset:
    build: Callable[..., NoiseModel]
    technology: str
    terms: str
    citation: str


PRESETS = {
    "pcm-joshi2020": Preset(pcm_joshi2020, "PCM", "programming, drift, read",
                            "Nandakumar et al. ICECS 2019; Joshi et al. Nat. Commun. 11:2473 (2020); aihwkit PCMLikeNoiseModel"),
    "reram-wan2022": Preset(reram_wan2022, "ReRAM", "programming (t = 1 s)",
                            "Wan et al. Nature 2022 (NeuRRAM); CrossSim RRAM_Wan"),
    "reram-milo2021": Preset(reram_milo2021, "ReRAM", "programming",
                             "Milo et al. IRPS 2021; CrossSim"),
    "gaussian": Preset(gaussian, "generic", f"programming, std = fraction * row w_max (default {GAUSSIAN_DEFAULT_FRACTION})",
                       "generic CIM-literature weight-noise model; 'gaussian:F' sets the fraction F"),
}


def get_preset(source: str) -> Optional[NoiseModel]:
    """The preset named by `source` ('gaussian:0.1' sets the fraction), or None if it names none."""
    name, _, arg = source.partition(":")
    if name == "gaussian" and arg:
        try:
            return gaussian(float(arg))
        except ValueError:
            raise UserError(f"params key 'noise.source': bad gaussian fraction {arg!r} in {source!r}") from None
    if source in PRESETS:
        return PRESETS[source].build()
    return None


def presets_cli(as_json: bool = False):
    if as_json:
        out = {name: {"technology": p.technology, "terms": p.terms, "citation": p.citation,
                      "g_max_uS": p.build().g_max, "description": p.build().description}
               for name, p in PRESETS.items()}
        print(json.dumps(out, indent=2))
        return
    print(f"{'name':16s} {'tech':8s} {'g_max uS':>9s}  terms / citation")
    for name, p in PRESETS.items():
        m = p.build()
        print(f"{name:16s} {p.technology:8s} {m.g_max:9.2f}  {p.terms}")
        print(f"{'':16s} {'':8s} {'':9s}  {p.citation}")
    print("\nnoise.source takes a preset name, 'gaussian:F' (F = std of w'-w as a fraction of the row's "
          "|w|max), a noise-model .json, or measurement CSV path(s)/glob (fitted).")
