"""Fit a conductance noise model from chip measurements (romer.cim.chip_data.Measurements).

Method (docs/noise.md has the details and which choices are this project's):
1. Levels: the distinct programmed targets, or equal-count bins of continuous targets.
2. Read noise (when some device has >= 2 reads at one time): per level and read time, the pooled
   within-device variance of repeated reads.
3. Programming noise, per level, at the level's earliest read time: the spread across devices of
   (measured - target), each device averaged over its repeated reads, less the read-noise variance
   that averaging leaves (sigma_read^2 / n_reads). Without repeated reads the spread includes read
   noise (flagged `includes_read_noise`). The mean of (measured - target) is the level's offset.
   sigma(g) is fitted by weighted least squares as a polynomial in g/g_max (weights: devices per
   level / sigma^2, iterated), with R^2.
4. Drift (when t_s has >= 2 distinct times per device): per device, least squares of ln g against
   ln(t/t0), t0 the earliest read time, nu = -slope; per level, nu's mean and std (the std less the
   per-device slope estimation variance). Without device_id, a population fit per level is used.
The output JSON tabulates every curve on a grid of g in [0, g_max] (g_max: the largest target):
piecewise linear between measured levels (read noise linear in variance), and below the lowest
measured level never held flat (`fit.extrapolation_below_range` says what was done):
- programming sigma: the fitted polynomial, clipped at 0;
- read noise, per read time: a measured RESET level (g_target = 0) when the data has one with a read
  estimate at that time (then there is nothing below range); else a power law sigma = a g^b through
  the lowest level, b fitted in log-log on the lowest READ_EXTRAP_LEVELS levels (b <= 0 or one level:
  b = 1), so sigma -> 0 at g = 0 as the PCM law |g| Q_s(g) sqrt(ln(...)) does;
- drift nu mean and std: a measured RESET level, as for read noise; else the PCM law's form, linear in
  ln g, through the lowest level with the slope fitted on the lowest DRIFT_EXTRAP_LEVELS levels
  (ln of max(g, 1e-3 g_max)), clipped to [0, 1.5 x the largest value measured at any level].
Above the highest level (g_max is the largest target, so only a level without an estimate) the
curves are held at the highest level's value.
"""

from __future__ import annotations

import math

import numpy as np

from romer.cim.chip_data import MIN_DEVICES_PER_LEVEL, Measurements, group_codes, load_measurements
from romer.cim.noise_models import FORMAT, GRID_POINTS, NoiseModel, _fl
from romer.core.errors import UserError
from romer.core.numerics import lstsq_exact, polyval_increasing

READ_MIN_GROUPS = 5  # devices with repeated reads needed per (level, time) to estimate read noise
READ_EXTRAP_LEVELS = 3  # lowest levels whose read sigma fixes the power law's exponent below range
DRIFT_EXTRAP_LEVELS = 2  # lowest levels whose nu fixes the ln g slope below range (the PCM law is flat above ~0.2 g_max)
DRIFT_EXTRAP_CAP = 1.5  # nu mean/std below range are capped at this times the largest measured value
LOG_FLOOR = 1e-3  # ln g is taken of max(g, LOG_FLOOR * g_max)


def _group(*cols):
    """Row -> group index for rows keyed by equal values in all of `cols`."""
    return group_codes(*cols)


def _wls_poly(x, y, n, degree, a=None, dof_a=None, iters=4):
    """Weighted LS polynomial (coefficients in powers of x), weights 1/Var(sigma_hat) iterated.

    Var(sigma_hat) ~ [2 (f^2 + a)^2/(n-1) + 2 a^2/dof_a] / (4 f^2) for a level of n devices, f the
    fitted sigma, a the read-noise variance subtracted (its estimate having dof_a degrees of freedom).
    """
    V = np.vander(x, degree + 1, increasing=True)
    n1 = np.maximum(n - 1, 1).astype(np.float64)
    a = np.zeros_like(y) if a is None else np.asarray(a, dtype=np.float64)
    dof_a = np.ones_like(y) if dof_a is None else np.maximum(np.asarray(dof_a, dtype=np.float64), 1)
    w = n1 / np.maximum(y, 1e-12) ** 2
    w = np.where(np.isfinite(w), w, n1)
    coef = None
    floor = max(1e-3 * float(np.max(np.abs(y))), 1e-12)
    for it in range(iters):
        sw = np.sqrt(w / w.max())
        try:
            coef = lstsq_exact(V * sw[:, None], y * sw)
        except np.linalg.LinAlgError:
            if len(np.unique(x)) > degree:  # enough levels: the values themselves overflow the solver
                raise UserError(f"noise fit: least squares failed on spreads up to {float(np.max(y)):.4g} uS; "
                                "check the rows' unit (the schema is microsiemens)") from None
            raise UserError(f"noise fit: a degree-{degree} polynomial needs at least {degree + 1} distinct "
                            f"conductance levels, the data has {len(np.unique(x))}; lower noise.degree / --degree") from None
        f2 = np.maximum(polyval_increasing(coef, x), floor) ** 2
        w = 4 * f2 / (2 * (f2 + a) ** 2 / n1 + 2 * a**2 / dof_a)
    fit = polyval_increasing(coef, x)
    wn = w / w.sum()
    ybar = float(np.sum(wn * y))
    ss_tot = float(np.sum(wn * (y - ybar) ** 2))
    ss_res = float(np.sum(wn * (y - fit) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    ss_tot_u = float(np.sum((y - y.mean()) ** 2))
    ss_res_u = float(np.sum((y - fit) ** 2))
    r2_u = 1.0 - ss_res_u / ss_tot_u if ss_tot_u > 0 else (1.0 if ss_res_u == 0 else 0.0)
    rmse_rel = float(np.sqrt(np.mean(((y - fit) / np.maximum(np.abs(fit), 1e-12)) ** 2)))
    return coef, r2, r2_u, rmse_rel


def _line(x, y):
    """(intercept, slope) of the least-squares line, CPU-independent (romer.core.numerics)."""
    return lstsq_exact(np.vander(np.asarray(x, dtype=np.float64), 2, increasing=True), y)


def _interp_grid(grid, xp, fp):
    """Piecewise linear through (xp, fp), held at the end values beyond them (np.interp)."""
    return np.interp(grid, np.asarray(xp), np.asarray(fp))


def _read_row(grid, g, var):
    """Read sigma on the grid from per-level (g ascending, variance): -> (row, how).

    Between levels linear in variance. Below the lowest level: nothing to do when it is a measured
    RESET level (g = 0); else sigma = a g^b through the lowest level, b from a log-log least-squares
    line on the lowest READ_EXTRAP_LEVELS levels with sigma > 0, b = 1 when that b <= 0 or there is
    only one such level.
    """
    g, var = np.asarray(g, dtype=np.float64), np.asarray(var, dtype=np.float64)
    row = np.sqrt(_interp_grid(grid, g, var))
    if g[0] == 0.0:
        return row, {"method": "measured_reset", "reset_sigma_uS": float(math.sqrt(var[0]))}
    sig = np.sqrt(var)
    low = [(x, y) for x, y in zip(g[:READ_EXTRAP_LEVELS], sig[:READ_EXTRAP_LEVELS]) if y > 0]
    how = {"method": "power_law", "levels_uS": [float(x) for x, _ in low]}
    if len(low) >= 2:
        b_fit = float(_line(np.log([x for x, _ in low]), np.log([y for _, y in low]))[1])
        b = b_fit if b_fit > 0 else 1.0
        how.update(b_fitted=b_fit, fallback=None if b_fit > 0 else "fitted b <= 0: b = 1 (proportional to g)")
    else:
        b = 1.0
        how.update(b_fitted=None, fallback="fewer than 2 levels with read sigma > 0: b = 1 (proportional to g)")
    a = float(sig[0]) / float(g[0]) ** b
    below = grid < g[0]
    row[below] = a * grid[below] ** b
    how.update(b=b, a=a, form="sigma_uS = a * g_uS^b below the lowest level")
    return row, how


def _drift_rows(grid, g, mean, std, g_max):
    """nu mean and std on the grid from per-level values (g ascending): -> (mean, std, how).

    Between levels piecewise linear. Below the lowest level: nothing to do when it is a measured
    RESET level (g = 0); else linear in ln g (the PCM law's form) through the lowest level, slope
    from a least-squares line on the lowest DRIFT_EXTRAP_LEVELS levels, clipped to
    [min(0, smallest measured), DRIFT_EXTRAP_CAP x largest measured] per curve.
    """
    g = np.asarray(g, dtype=np.float64)
    if g[0] == 0.0:
        how = {"method": "measured_reset", "reset_mean": float(mean[0]), "reset_std": float(std[0])}
        return _interp_grid(grid, g, mean), _interp_grid(grid, g, std), how
    floor = LOG_FLOOR * g_max
    lg = np.log(np.maximum(grid, floor))
    lg0 = math.log(max(float(g[0]), floor))
    below = grid < g[0]
    out = []
    k = min(DRIFT_EXTRAP_LEVELS, len(g))
    how = {"method": "ln_g_linear" if k >= 2 else "constant", "levels_uS": [float(x) for x in g[:k]],
           "ln_floor_uS": floor}
    for name, v in (("mean", np.asarray(mean, dtype=np.float64)), ("std", np.asarray(std, dtype=np.float64))):
        row = _interp_grid(grid, g, v)
        slope = float(_line(np.log(g[:k]), v[:k])[1]) if k >= 2 else 0.0
        lo, hi = min(0.0, float(v.min())), max(DRIFT_EXTRAP_CAP * float(v.max()), 0.0)
        row[below] = np.clip(v[0] + slope * (lg[below] - lg0), lo, hi)
        how[f"{name}_slope_per_ln_uS"] = slope
        how[f"{name}_bounds"] = [lo, hi]
        out.append(row)
    return out[0], out[1], how


def _extrapolation_note(levels, read_how, read_times, drift_how):
    """fit.extrapolation_below_range: what each noise term does below the lowest measured level."""
    note = {"programming_sigma": "polynomial (the fitted sigma(g) continued to g = 0, clipped at 0)",
            "lowest_level_uS": float(min(lv["g_uS"] for lv in levels))}
    if not read_how:
        note["read_noise"] = None
    elif all(h["method"] == "measured_reset" for h in read_how):
        note["read_noise"] = "measured RESET level (g_target = 0), linear in variance toward it"
    else:
        law = (f"power_law a*g^b through the lowest level (b fitted in log-log on the lowest {READ_EXTRAP_LEVELS} "
               "levels)")
        mixed = any(h["method"] == "measured_reset" for h in read_how)
        parts = []
        for t, h in zip(read_times, read_how):
            if h["method"] == "measured_reset":
                parts.append(f"t = {t:g} s: measured RESET level (g_target = 0)")
            else:
                parts.append(f"t = {t:g} s: " + (f"{law}, " if mixed else "") + f"b = {h['b']:.4g}"
                             + (f" ({h['fallback']})" if h["fallback"] else ""))
        note["read_noise"] = ("" if mixed else f"{law}, ") + "per read time: " + "; ".join(parts)
    note["read_noise_per_time"] = [dict(t_s=float(t), **h) for t, h in zip(read_times, read_how)]
    if drift_how is None:
        note["drift_nu"] = None
    elif drift_how["method"] == "measured_reset":
        note["drift_nu"] = "measured RESET level (g_target = 0), linear toward it"
    else:
        (ml, mh), (sl, sh) = drift_how["mean_bounds"], drift_how["std_bounds"]
        form = ("linear in ln g through the lowest level (slope from a line on the lowest "
                f"{len(drift_how['levels_uS'])} levels: mean {drift_how['mean_slope_per_ln_uS']:.4g}, "
                f"std {drift_how['std_slope_per_ln_uS']:.4g} per unit ln g)"
                if drift_how["method"] == "ln_g_linear" else "constant (only one level has a drift estimate)")
        low = "0" if min(ml, sl) >= 0 else "0 or the smallest measured value if negative"
        note["drift_nu"] = (f"{form}, ln g of max(g, {drift_how['ln_floor_uS']:g} uS); clipped to "
                            f"[{low}, {DRIFT_EXTRAP_CAP:g} x the largest value measured at any level]: mean in "
                            f"[{ml:.4g}, {mh:.4g}], std in [{sl:.4g}, {sh:.4g}]")
    note["drift_nu_detail"] = drift_how
    return note


def _read_noise(m: Measurements, dev):
    """Pooled within-device read variance per (level, time). -> dict[(level, t)] = (var, n_groups)."""
    t = m.t_s if m.t_s is not None else np.zeros(len(m))
    gi, ng = _group(dev, t)
    cnt = np.bincount(gi, minlength=ng)
    if cnt.max() < 2:
        return {}
    mean = np.bincount(gi, weights=m.g_measured, minlength=ng) / cnt
    ss = np.bincount(gi, weights=(m.g_measured - mean[gi]) ** 2, minlength=ng)
    # level and time of each group
    g_level = np.zeros(ng, dtype=np.int64)
    g_level[gi] = m.level
    g_t = np.zeros(ng)
    g_t[gi] = t
    rep = cnt >= 2
    out = {}
    inv, nk = _group(g_level[rep], g_t[rep])
    uk = np.zeros((nk, 2))
    uk[inv, 0] = g_level[rep]
    uk[inv, 1] = g_t[rep]
    ss_k = np.bincount(inv, weights=ss[rep])
    dof_k = np.bincount(inv, weights=(cnt[rep] - 1).astype(np.float64))
    n_k = np.bincount(inv)
    for (lv, tt), s, d, n in zip(uk, ss_k, dof_k, n_k):
        if n >= READ_MIN_GROUPS:
            out[(int(lv), float(tt))] = (float(s / d), int(n), float(d))
    return out


MAX_CENSORED = 0.8  # a level with more of its devices read as 0 than this is left out of the sigma fit


def _censored_normal(x, c, cens):
    """MLE (mean, std) of a normal sample left-censored at c (cens: x <= c was clipped to c)."""
    import torch

    xu = torch.as_tensor(x[~cens], dtype=torch.float64)
    cc = torch.as_tensor(c[cens], dtype=torch.float64)
    sd0 = float(np.std(x[~cens], ddof=1)) if (~cens).sum() > 1 else 1.0
    sd0 = sd0 if sd0 > 0 else 1.0
    mu0 = float(np.mean(x))
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # (mu - mu0)/sd0, log(sd/sd0)
    opt = torch.optim.LBFGS([p], max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        mu, sd = mu0 + sd0 * p[0], sd0 * p[1].exp()
        z = (xu - mu) / sd
        nll = 0.5 * (z * z).sum() + len(xu) * torch.log(sd) - torch.special.log_ndtr((cc - mu) / sd).sum()
        nll.backward()
        return nll

    opt.step(closure)
    p = p.detach()
    return mu0 + sd0 * float(p[0]), sd0 * math.exp(float(p[1]))


def _programming(m: Measurements, dev, read):
    """Per level at its earliest read: offset, total std, programming sigma, n devices."""
    early = m.earliest_mask()
    L = len(m.level_g)
    r = m.g_measured - m.g_target
    gi, ng = _group(dev[early], m.level[early])
    cnt = np.bincount(gi, minlength=ng)
    dmean = np.bincount(gi, weights=r[early], minlength=ng) / cnt
    dtarget = np.bincount(gi, weights=m.g_target[early], minlength=ng) / cnt
    d_level = np.zeros(ng, dtype=np.int64)
    d_level[gi] = m.level[early]
    t_early = np.zeros(L)
    if m.t_s is not None:
        t_early[m.level[early]] = m.t_s[early]
    rows = []
    any_read = False
    for lv in range(L):
        sel = d_level == lv
        dm, n_reads = dmean[sel], cnt[sel]
        rl = r[early][m.level[early] == lv]
        var_between = float(np.var(dm, ddof=1))
        offset = float(rl.mean())
        # devices read as 0: conductances clipped at 0 (censored); fit a censored normal instead
        floor = -dtarget[sel]
        cens = dm <= floor + 1e-12
        p0 = float(cens.mean())
        if 0 < p0 <= MAX_CENSORED:
            mu, sd = _censored_normal(dm, floor, cens)
            n = len(dm)
            var_between, offset = sd * sd * n / max(n - 1, 1), mu
        rv = read.get((lv, float(t_early[lv]))) if m.t_s is not None else read.get((lv, 0.0))
        sub = 0.0
        if rv is not None:
            sub = float(np.mean(rv[0] / n_reads))
            any_read = True
        rows.append({
            "g_uS": float(m.level_g[lv]),
            "t_s": float(t_early[lv]) if m.t_s is not None else None,
            "n_devices": int(sel.sum()),
            "n_rows": int(len(rl)),
            "offset_uS": offset,
            "std_uS": float(np.std(rl, ddof=1)),
            "device_std_uS": math.sqrt(var_between),
            "sigma_prog_uS": math.sqrt(max(var_between - sub, 0.0)),
            "read_sigma_uS": math.sqrt(rv[0]) if rv is not None else None,
            "censored_frac": p0,
            "in_fit": p0 <= MAX_CENSORED,
            "_read_var_share": sub,
            "_read_dof": rv[2] if rv is not None else 1,
        })
    return rows, any_read


def _drift_per_device(m: Measurements, dev, t0):
    """Per device: nu (= -slope of ln g vs ln(t/t0)) and its estimation variance (NaN if unknown)."""
    gi, ng = _group(dev, m.t_s)
    cnt = np.bincount(gi, minlength=ng)
    gbar = np.bincount(gi, weights=m.g_measured, minlength=ng) / cnt
    g_dev = np.zeros(ng, dtype=np.int64)
    g_dev[gi] = dev
    g_t = np.zeros(ng)
    g_t[gi] = m.t_s
    n_dev = int(dev.max()) + 1
    bad = np.bincount(g_dev, weights=(gbar <= 0).astype(np.float64), minlength=n_dev) > 0
    ok = ~bad[g_dev]
    x = np.log(g_t / t0)
    y = np.log(np.where(gbar > 0, gbar, 1.0))
    def s(v):
        return np.bincount(g_dev[ok], weights=v[ok], minlength=n_dev)
    k = np.bincount(g_dev[ok], minlength=n_dev).astype(np.float64)
    Sx, Sy, Sxx, Sxy, Syy = s(x), s(y), s(x * x), s(x * y), s(y * y)
    with np.errstate(divide="ignore", invalid="ignore"):
        sxx = Sxx - Sx**2 / k
        sxy = Sxy - Sx * Sy / k
        syy = Syy - Sy**2 / k
        slope = sxy / sxx
        rss = np.maximum(syy - slope * sxy, 0.0)
        se2 = np.where(k > 2, rss / (k - 2) / sxx, np.nan)
    valid = (k >= 2) & (sxx > 1e-12)
    dev_level = np.zeros(n_dev, dtype=np.int64)
    dev_level[dev] = m.level
    return -slope, se2, valid, dev_level


def _drift(m: Measurements, dev, has_dev):
    """Per-level drift exponent statistics, or None when the data cannot give them."""
    if m.t_s is None or len(np.unique(m.t_s)) < 2:
        return None, "no t_s column" if m.t_s is None else "a single read time"
    t0 = float(m.t_s.min())
    L = len(m.level_g)
    per = []
    if has_dev:
        nu, se2, valid, dev_level = _drift_per_device(m, dev, t0)
        method = "per_device"
        for lv in range(L):
            sel = valid & (dev_level == lv)
            n = int(sel.sum())
            if n < MIN_DEVICES_PER_LEVEL:
                continue
            v = nu[sel]
            var = float(np.var(v, ddof=1))
            e = se2[sel]
            corrected = bool(np.isfinite(e).all())
            if corrected:
                var = max(var - float(np.mean(e)), 0.0)
            per.append({"g_uS": float(m.level_g[lv]), "n_devices": n, "nu_mean": float(v.mean()),
                        "nu_std": math.sqrt(var), "nu_std_raw": float(np.std(v, ddof=1)),
                        "std_corrected": corrected})
        if not per:
            return None, "fewer than 2 read times per device"
    else:
        method = "population"  # no device_id: fit level statistics over time
        pos = m.g_measured > 0
        for lv in range(L):
            sel = pos & (m.level == lv)
            times = np.unique(m.t_s[sel])
            xs, mu, var = [], [], []
            for tt in times:
                lg = np.log(m.g_measured[sel & (m.t_s == tt)])
                if len(lg) >= MIN_DEVICES_PER_LEVEL:
                    xs.append(math.log(tt / t0))
                    mu.append(lg.mean())
                    var.append(lg.var(ddof=1))
            if len(xs) < 2:
                continue
            xs, mu, var = map(np.asarray, (xs, mu, var))
            b = _line(xs, mu)[1]
            vs = _line(xs**2, var)[1] if len(xs) >= 2 and np.ptp(xs**2) > 0 else 0.0
            per.append({"g_uS": float(m.level_g[lv]), "n_devices": int(sel.sum()), "nu_mean": float(-b),
                        "nu_std": math.sqrt(max(float(vs), 0.0)), "nu_std_raw": None, "std_corrected": False})
        if not per:
            return None, "too few reads per time"
    g = np.array([p["g_uS"] for p in per])
    mean = np.array([p["nu_mean"] for p in per])
    std = np.array([p["nu_std"] for p in per])
    param = None
    if len(per) >= 2:
        lx = np.log(np.maximum(g, 1e-12) / m.g_target.max())
        param = {"form": "a + b * ln(g/g_max) (summary only; the model uses the table)",
                 "mean_ab": [float(c) for c in _line(lx, mean)],
                 "std_ab": [float(c) for c in _line(lx, std)]}
    return {"t0_s": t0, "method": method, "levels": per, "parametric": param}, None


# ---- sanity gates: data that cannot be a noise measurement is refused, naming the rows ------------
MAX_OFFSET_FRAC = 0.5  # a level whose mean (measured - target) exceeds this x g_max is not of its devices


def _first_row(m: Measurements, lv: int) -> str:
    return m.where(int(np.flatnonzero(m.level == lv)[0]))


def _check_degree(files, n_levels, degree, what):
    """At least 2 levels per coefficient: fewer and the polynomial follows each level's own noise."""
    need = 2 * (degree + 1)
    if n_levels < need:
        hint = (f"lower --degree (noise.degree) to at most {n_levels // 2 - 1}" if n_levels >= 2
                else "measure at least 2 levels")
        raise UserError(
            f"{files}: column 'g_target_uS': {n_levels} {what}, but a degree-{degree} polynomial "
            f"({degree + 1} coefficients) needs at least {need} (2 levels per coefficient); {hint}")


def _check_levels(m: Measurements, levels, use, g_max):
    """Refuse a level with no spread (reads stuck at one value) or an offset near g_max (wrong device)."""
    stuck = [i for i, lv in enumerate(levels) if use[i] and lv["std_uS"] == 0.0]
    if stuck:
        i = stuck[0]
        raise UserError(
            f"{_first_row(m, i)}: level {levels[i]['g_uS']:g} uS: all {levels[i]['n_rows']} reads have the same "
            f"value (zero spread: reads stuck at one value?); a noise fit needs the measured spread"
            + (f" ({len(stuck)} of {int(use.sum())} levels are like this)" if len(stuck) > 1 else ""))
    far = [i for i, lv in enumerate(levels) if use[i] and abs(lv["offset_uS"]) > MAX_OFFSET_FRAC * g_max]
    if far:
        i = far[0]
        raise UserError(
            f"{_first_row(m, i)}: level {levels[i]['g_uS']:g} uS: mean (measured - target) is "
            f"{levels[i]['offset_uS']:.4g} uS, more than {MAX_OFFSET_FRAC:g} x g_max ({g_max:g} uS): these reads are "
            "not of devices programmed to that target (or a column is in another unit)"
            + (f" ({len(far)} levels are like this)" if len(far) > 1 else ""))


def _check_fit(m: Measurements, levels, use, degree, coef, r2, sig_grid, g_max):
    """Refuse a fit that is no fit: non-finite, sigma above g_max, or worse than a constant (R² < 0)."""
    idx = np.flatnonzero(use)
    std = np.array([levels[i]["device_std_uS"] for i in idx])
    worst = int(idx[int(np.argmax(std))])
    where = (f"largest spread {levels[worst]['device_std_uS']:.4g} uS at level {levels[worst]['g_uS']:g} uS, "
             f"first row {_first_row(m, worst)}")
    if not np.all(np.isfinite(coef)):
        raise UserError(f"noise fit: the sigma(g) polynomial is not finite ({where}); check that row's unit")
    if float(sig_grid.max()) > g_max or float(std.max()) > g_max:
        raise UserError(
            f"noise fit: programming sigma reaches {max(float(sig_grid.max()), float(std.max())):.4g} uS, above g_max "
            f"({g_max:g} uS): not a plausible device ({where}; a row in another unit?)")
    if degree >= 1 and r2 < 0:  # a degree-0 fit is a constant: its R² is 0 by construction
        fit = polyval_increasing(coef, np.array([levels[i]["g_uS"] for i in idx]) / g_max)
        sig = np.array([levels[i]["sigma_prog_uS"] for i in idx])
        far = int(idx[int(np.argmax(np.abs(sig - fit) / np.maximum(fit, 1e-12)))])
        k = int(np.flatnonzero(idx == far)[0])
        raise UserError(
            f"noise fit: R² = {r2:.4g} < 0, the degree-{degree} sigma(g) fits worse than a constant: the spread per "
            f"level does not follow a smooth curve. Farthest from it: level {levels[far]['g_uS']:g} uS (sigma "
            f"{sig[k]:.4g} uS, fitted {fit[k]:.4g} uS), first row {_first_row(m, far)}; check those rows or lower --degree")


def fit_noise(measurements: Measurements, degree: int = 2, source: str | None = None) -> dict:
    """Fit the noise model JSON (see DESIGN.md and docs/noise.md) from validated measurements."""
    m = measurements
    files = ", ".join(m.files)
    if not isinstance(degree, (int, np.integer)) or isinstance(degree, bool) or degree < 0:
        raise UserError(f"--degree/noise.degree must be an integer >= 0, got {degree!r}")
    L = len(m.level_g)
    _check_degree(files, L, degree, "programmed level(s)")
    g_max = float(m.g_target.max())
    if not g_max > 0:
        raise UserError(f"{files}: column 'g_target_uS': all targets are 0; need targets > 0 to set g_max")
    dev, n_dev = m.device_keys()
    read = _read_noise(m, dev) if m.device is not None else {}
    levels, read_used = _programming(m, dev, read)

    lg = np.array([lv["g_uS"] for lv in levels])
    use = np.array([lv["in_fit"] for lv in levels])
    sig = np.array([lv["sigma_prog_uS"] for lv in levels])
    n_eff = np.array([lv["n_devices"] * (1 - lv["censored_frac"]) for lv in levels])
    a = np.array([lv["_read_var_share"] for lv in levels])
    dof_a = np.array([lv["_read_dof"] for lv in levels])
    for lv in levels:
        del lv["_read_var_share"], lv["_read_dof"]
    _check_degree(files, int(use.sum()), degree, "level(s) with most reads above 0")
    _check_levels(m, levels, use, g_max)
    coef, r2, r2_u, rmse_rel = _wls_poly(lg[use] / g_max, sig[use], n_eff[use], degree, a[use], dof_a[use])
    grid = np.linspace(0.0, g_max, GRID_POINTS)
    sig_grid = np.maximum(np.polyval(coef[::-1], grid / g_max), 0.0)
    _check_fit(m, levels, use, degree, coef, r2, sig_grid, g_max)

    drift, why_no_drift = _drift(m, dev, m.device is not None)
    drift_json = drift_how = None
    if drift is not None:
        dl = drift["levels"]
        gx = [p["g_uS"] for p in dl]
        d_mean, d_std, drift_how = _drift_rows(grid, gx, [p["nu_mean"] for p in dl], [p["nu_std"] for p in dl], g_max)
        drift_json = {"g_uS": _fl(grid), "mean": _fl(d_mean), "std": _fl(d_std), "t0_s": drift["t0_s"],
                      "law": "table"}
        for lv in levels:
            p = next((p for p in dl if p["g_uS"] == lv["g_uS"]), None)
            lv["nu_mean"] = p["nu_mean"] if p else None
            lv["nu_std"] = p["nu_std"] if p else None

    read_json = None
    times, read_how = [], []
    if read:
        times = sorted({t for (_, t) in read})
        rows = []
        for t in times:
            pts = sorted((m.level_g[lv], v[0]) for (lv, tt), v in read.items() if tt == t)
            row, how = _read_row(grid, [p[0] for p in pts], [p[1] for p in pts])
            rows.append(_fl(row))
            read_how.append(how)
        read_json = {"law": "table", "g_uS": _fl(grid), "t_s": _fl(times) if m.t_s is not None else [1.0],
                     "sigma_uS": rows,
                     "levels": [{"g_uS": float(m.level_g[lv]), "t_s": t, "sigma_uS": math.sqrt(v[0]), "n_devices": v[1]}
                                for (lv, t), v in sorted(read.items())]}
        if m.t_s is None:
            read_json["note"] = "no t_s column: read noise is taken as constant in time"

    n_rows = len(m)
    return {
        "format": FORMAT,
        "name": "fitted",
        "kind": "fitted",
        "description": f"fitted from {len(m.files)} measurement file(s)",
        "citation": "",
        "source": source or files,
        "files": list(m.files),
        "preset": None,
        "g_max_uS": g_max,
        "clip_at_zero": True,
        "programming_sigma_uS": {"g_uS": _fl(grid), "sigma_uS": _fl(sig_grid)},
        "programming_sigma_poly": {"form": "sigma_uS = sum_k coeffs_uS[k] * (g/g_max)^k", "degree": int(degree),
                                   "coeffs_uS": [float(c) for c in coef], "r2": r2},
        "mean_offset_uS": {"g_uS": _fl(lg), "offset_uS": _fl([lv["offset_uS"] for lv in levels]),
                           "note": "reported, not applied to weights"},
        "drift_nu": drift_json,
        "read_noise": read_json,
        "fit": {
            "degree": int(degree), "r2": r2, "r2_unweighted": r2_u, "rmse_rel": rmse_rel,
            "n_levels": L, "n_levels_fitted": int(use.sum()),
            "n_devices": int(sum(lv["n_devices"] for lv in levels)), "n_rows": n_rows, "binned": bool(m.binned),
            "fitted_range_uS": [float(lg[use].min()), float(lg[use].max())],
            "censored_levels": int(sum(lv["censored_frac"] > 0 for lv in levels)),
            "includes_read_noise": not read_used,
            "drift": "fitted" if drift is not None else f"none ({why_no_drift})",
            "read_noise": "fitted" if read else ("none (no device_id column)" if m.device is None
                                                 else "none (no repeated reads of a device at one time)"),
            "extrapolation_below_range": _extrapolation_note(
                levels, read_how, times if m.t_s is not None else [1.0] * len(times), drift_how),
        },
        "drift_fit": ({k: drift[k] for k in ("method", "t0_s", "parametric")} if drift else None),
        "levels": levels,
    }


def plot_fit(fit_json: dict, png_path):
    """PNG: measured std per level with the fitted sigma(g); nu per level when drift is fitted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    has_drift = fit_json.get("drift_nu") is not None
    has_read = fit_json.get("read_noise") is not None
    n = 1 + has_drift + has_read
    fig = Figure(figsize=(3.7 * n, 3.2))  # <= 1110 px wide at 100 dpi (3 panels)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    ax = axes[0]
    ps = fit_json["programming_sigma_uS"]
    levels = fit_json.get("levels") or []
    fit = fit_json.get("fit") or {}
    if levels:
        g = [lv["g_uS"] for lv in levels]
        ax.plot(g, [lv["std_uS"] for lv in levels], "o", mfc="none", label="measured std (all reads)")
        if not fit.get("includes_read_noise", True):
            ax.plot(g, [lv["sigma_prog_uS"] for lv in levels], "s", ms=4, label="programming std (read noise removed)")
    label = "fit"
    if fit:
        label = f"fit, degree {fit.get('degree')}, R² = {fit.get('r2', float('nan')):.4f}"
    ax.plot(ps["g_uS"], ps["sigma_uS"], "-", label=label if levels else fit_json.get("name", "model"))
    ax.set_xlabel("target conductance g (uS)")
    ax.set_ylabel("sigma (uS)")
    ax.set_title("programming noise")
    ax.set_xlim(0, fit_json["g_max_uS"] * 1.02)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    k = 1
    if has_drift:
        ax = axes[k]
        k += 1
        d = fit_json["drift_nu"]
        gg, mean, std = map(np.asarray, (d["g_uS"], d["mean"], d["std"]))
        ax.plot(gg, mean, "-", label="nu mean")
        ax.fill_between(gg, mean - std, mean + std, alpha=0.25, label="± nu std")
        pts = [lv for lv in levels if lv.get("nu_mean") is not None]
        if pts:
            ax.errorbar([p["g_uS"] for p in pts], [p["nu_mean"] for p in pts], yerr=[p["nu_std"] for p in pts],
                        fmt="o", mfc="none", capsize=3, label="per level")
        ax.set_xlabel("target conductance g (uS)")
        ax.set_ylabel("drift exponent nu")
        ax.set_title(f"drift, t0 = {d['t0_s']:g} s")
        ax.legend(fontsize=8)
    if has_read:
        ax = axes[k]
        r = fit_json["read_noise"]
        for t, row in zip(r["t_s"], r["sigma_uS"]):
            ax.plot(r["g_uS"], row, "-", label=f"t = {t:g} s")
        pts = r.get("levels") or []
        if pts:
            ax.plot([p["g_uS"] for p in pts], [p["sigma_uS"] for p in pts], "k.", ms=4, label="per level and time")
        ax.set_xlabel("target conductance g (uS)")
        ax.set_ylabel("read sigma (uS)")
        ax.set_title("read noise")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle(f"noise model: {fit_json.get('source') or fit_json.get('name')}"[:110], fontsize=9)
    fig.tight_layout()
    fig.savefig(str(png_path), format="png", dpi=100, bbox_inches="tight")


def fit_noise_cli(csv_list, output, degree: int = 2, plot=None):
    """`romer fit-noise`: fit, then write the JSON and the plot together (both or neither; an existing
    file is replaced only when the whole command succeeds); nothing on error."""
    import os

    from romer.core.io import atomic_path, check_output, staged_outputs, write_json

    for out in (output, plot):  # before the fit: a bad path is named at once
        if out is not None:
            check_output(out)
    m = load_measurements(csv_list)
    in_files = {os.path.abspath(f) for f in m.files}
    for out in (output, plot):
        if out is not None and os.path.abspath(out) in in_files:
            raise UserError(f"{out}: output would overwrite an input CSV")
    if plot is not None and os.path.abspath(plot) == os.path.abspath(output):
        raise UserError(f"{plot}: --plot and -o name the same file")
    fit = fit_noise(m, degree=degree)
    NoiseModel.from_json(fit)  # the JSON must load back
    with staged_outputs():
        if plot is not None:
            with atomic_path(plot) as tmp:
                plot_fit(fit, tmp)
        write_json(output, fit)
    f = fit["fit"]
    c = ", ".join(f"{x:.5g}" for x in fit["programming_sigma_poly"]["coeffs_uS"])
    print(f"fitted {f['n_levels']} levels, {f['n_devices']} devices ({f['n_rows']} reads), g_max = {fit['g_max_uS']:g} uS")
    print(f"programming sigma(g) = poly(g/g_max) with coeffs [{c}] uS, R² = {f['r2']:.4f}")
    print(f"drift: {f['drift']}; read noise: {f['read_noise']}")
    print(f"wrote {output}" + (f" and {plot}" if plot else ""))
