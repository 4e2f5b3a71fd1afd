"""Chip-measurement CSVs: load, validate, and group into programmed levels.

Schema (DESIGN.md, one row per read of one device):

    g_target_uS    required  conductance the device was programmed to (uS, >= 0)
    g_measured_uS  required  conductance read back (uS, >= 0)
    t_s            optional  time since programming at the read (s, > 0)
    device_id      optional  which device (any non-empty text)
    read_id        optional  repeat index of reads of one device at one time (any non-empty text)

Other columns are ignored. Column names are matched case-insensitively after stripping blanks;
lines whose first cell starts with '#' are comments. Several files (paths or globs) can be
combined; they must share the same optional columns. A `device_id` is local to its file (the
same id in two files names two devices), so all reads of one device must be in one file.

Every problem raises UserError naming the file and the line (row) or column. Nothing is written.
"""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from romer.core.errors import UserError

REQUIRED = ("g_target_uS", "g_measured_uS")
OPTIONAL = ("t_s", "device_id", "read_id")
NUMERIC = ("g_target_uS", "g_measured_uS", "t_s")

MIN_DEVICES_PER_LEVEL = 10  # fewer than this and the std of a level is too uncertain to fit
MAX_DISCRETE_LEVELS = 64  # more distinct targets than this are treated as continuous and binned
MAX_BINS = 32
DEVICES_PER_BIN = 50  # target devices per bin for continuous targets


@dataclass
class Measurements:
    """Validated reads, one entry per CSV row, as numpy arrays.

    device: int code per row, unique across files (file-scoped device ids); None without device_id.
    read_id: int code per row; None without read_id.
    level: index into level_g per row; level_g: the level's target conductance (uS), ascending.
    binned: True when continuous targets were binned (level_g is then the bin's mean target).
    """

    files: list
    g_target: np.ndarray
    g_measured: np.ndarray
    t_s: Optional[np.ndarray]
    device: Optional[np.ndarray]
    read_id: Optional[np.ndarray]
    file_idx: np.ndarray
    line: np.ndarray
    level: np.ndarray = field(default=None)
    level_g: np.ndarray = field(default=None)
    binned: bool = False

    def __len__(self):
        return len(self.g_target)

    def where(self, i):
        """'file, line N' of row i, for messages."""
        return f"{self.files[self.file_idx[i]]}, line {self.line[i]}"

    def device_keys(self):
        """Per-row device index (0..n_dev-1): device_id scoped to its file and its target.

        Without device_id every row is its own device.
        """
        if self.device is None:
            return np.arange(len(self)), len(self)
        return group_codes(self.device, self.g_target)

    def earliest_mask(self):
        """Rows read at the earliest time of their level (all rows when there is no t_s)."""
        if self.t_s is None:
            return np.ones(len(self), dtype=bool)
        tmin = np.full(len(self.level_g), np.inf)
        np.minimum.at(tmin, self.level, self.t_s)
        return np.isclose(self.t_s, tmin[self.level], rtol=1e-9, atol=0)


def group_codes(*cols):
    """Row -> group index (0..n-1) for rows keyed by equal values in all of `cols` (1D arrays)."""
    key = np.zeros(len(cols[0]), dtype=np.int64)
    for c in cols:
        _, inv = np.unique(np.asarray(c), return_inverse=True)
        inv = inv.reshape(-1)
        n = int(inv.max()) + 1 if len(inv) else 1
        key = key * n + inv
    _, inv = np.unique(key, return_inverse=True)
    inv = inv.reshape(-1)
    return inv, (int(inv.max()) + 1 if len(inv) else 0)


def expand_paths(paths_or_globs: Union[str, os.PathLike, Sequence]) -> list:
    """Expand paths and globs into a sorted, de-duplicated list of existing files."""
    if isinstance(paths_or_globs, (str, os.PathLike)):
        paths_or_globs = [paths_or_globs]
    if not paths_or_globs:
        raise UserError("no measurement CSV given")
    out = []
    for p in paths_or_globs:
        p = str(p)
        if glob.has_magic(p):
            hits = sorted(glob.glob(p, recursive=True))
            hits = [h for h in hits if os.path.isfile(h)]
            if not hits:
                raise UserError(f"{p}: no file matches this pattern")
        else:
            if not os.path.exists(p):
                raise UserError(f"{p}: file not found")
            if os.path.isdir(p):
                raise UserError(f"{p}: is a directory; give a CSV file or a glob such as {p.rstrip('/')}/*.csv")
            hits = [p]
        for h in hits:
            if h not in out:
                out.append(h)
    return out


def _read_one(path):
    """Parse one CSV into ({column: list of str}, list of line numbers)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text CSV file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    if not text.strip():
        raise UserError(f"{path}: empty file (expected a header row with columns {', '.join(REQUIRED)})")
    reader = csv.reader(text.splitlines())
    header = None
    rows, lines = [], []
    for cells in reader:
        ln = reader.line_num
        if not cells or cells[0].lstrip().startswith("#") or (len(cells) == 1 and not cells[0].strip()):
            continue
        if header is None:
            header = [c.strip() for c in cells]
            continue
        if len(cells) != len(header):
            raise UserError(
                f"{path}, line {ln} (data row {len(rows) + 1}): expected {len(header)} fields "
                f"as in the header, got {len(cells)}")
        rows.append(cells)
        lines.append(ln)
    if header is None:
        raise UserError(f"{path}: empty file (only comments or blank lines)")
    lower = [h.lower() for h in header]
    cols = {}
    for name in REQUIRED + OPTIONAL:
        hits = [i for i, h in enumerate(lower) if h == name.lower()]
        if len(hits) > 1:
            raise UserError(f"{path}: column '{name}' appears {len(hits)} times in the header")
        if hits:
            cols[name] = hits[0]
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        hint = ""
        if len(header) == 1 and any(ch in header[0] for ch in ";\t|"):
            hint = " (the delimiter must be a comma)"
        raise UserError(
            f"{path}: missing required column(s) {', '.join(repr(c) for c in missing)}{hint}; "
            f"found columns {header}")
    if not rows:
        raise UserError(f"{path}: no data rows after the header")
    data = {name: [r[i].strip() for r in rows] for name, i in cols.items()}
    return data, np.asarray(lines, dtype=np.int64)


def _to_float(path, name, values, lines):
    try:
        arr = np.asarray(values, dtype=np.float64)
    except ValueError:
        arr = None
    if arr is None:  # find the first bad cell, to name it
        for k, v in enumerate(values):
            try:
                float(v)
            except ValueError:
                what = "is empty" if v == "" else f"'{v}' is not a number"
                raise UserError(f"{path}, line {lines[k]} (data row {k + 1}), column '{name}': {what}") from None
    bad = np.flatnonzero(~np.isfinite(arr))
    if len(bad):
        k = bad[0]
        raise UserError(
            f"{path}, line {lines[k]} (data row {k + 1}), column '{name}': value '{values[k]}' is not finite"
            + (f" ({len(bad)} such rows)" if len(bad) > 1 else ""))
    return arr


def _check_text(path, name, values, lines):
    for k, v in enumerate(values):
        if v == "":
            raise UserError(f"{path}, line {lines[k]} (data row {k + 1}), column '{name}': is empty")


def load_measurements(paths_or_globs, min_devices: int = MIN_DEVICES_PER_LEVEL) -> Measurements:
    """Read, validate and combine measurement CSVs; group targets into levels.

    Raises UserError (naming the file and line or column) on any problem.
    """
    files = expand_paths(paths_or_globs)
    parts = []
    optional_sets = []
    for fi, path in enumerate(files):
        data, lines = _read_one(path)
        num = {}
        for name in NUMERIC:
            if name in data:
                num[name] = _to_float(path, name, data[name], lines)
        for name in ("g_target_uS", "g_measured_uS"):
            neg = np.flatnonzero(num[name] < 0)
            if len(neg):
                k = neg[0]
                raise UserError(
                    f"{path}, line {lines[k]} (data row {k + 1}), column '{name}': conductance "
                    f"{data[name][k]} is negative; conductances must be >= 0 uS")
        if "t_s" in num:
            bad = np.flatnonzero(num["t_s"] <= 0)
            if len(bad):
                k = bad[0]
                raise UserError(
                    f"{path}, line {lines[k]} (data row {k + 1}), column 't_s': time {data['t_s'][k]} "
                    "must be > 0 (seconds since programming)")
        for name in ("device_id", "read_id"):
            if name in data:
                _check_text(path, name, data[name], lines)
        optional_sets.append(tuple(c for c in OPTIONAL if c in data))
        parts.append((path, data, num, lines))

    if len(set(optional_sets)) > 1:
        ref = optional_sets[0]
        for (path, *_), opt in zip(parts, optional_sets):
            if opt != ref:
                raise UserError(
                    f"{path}: has optional columns {list(opt) or 'none'} but {files[0]} has "
                    f"{list(ref) or 'none'}; combined CSVs must have the same columns")
    opt = optional_sets[0]

    g_t = np.concatenate([p[2]["g_target_uS"] for p in parts])
    g_m = np.concatenate([p[2]["g_measured_uS"] for p in parts])
    t_s = np.concatenate([p[2]["t_s"] for p in parts]) if "t_s" in opt else None
    file_idx = np.concatenate([np.full(len(p[3]), i, dtype=np.int64) for i, p in enumerate(parts)])
    line = np.concatenate([p[3] for p in parts])
    device = read_id = None
    if "device_id" in opt:
        codes = {}
        device = np.empty(len(g_t), dtype=np.int64)
        k = 0
        for fi, (path, data, _, _) in enumerate(parts):
            for v in data["device_id"]:
                device[k] = codes.setdefault((fi, v), len(codes))
                k += 1
    if "read_id" in opt:
        rcodes = {}
        read_id = np.asarray([rcodes.setdefault(v, len(rcodes)) for p in parts for v in p[1]["read_id"]],
                             dtype=np.int64)

    m = Measurements(files=files, g_target=g_t, g_measured=g_m, t_s=t_s, device=device,
                     read_id=read_id, file_idx=file_idx, line=line)
    if device is not None and read_id is not None:
        _check_duplicate_reads(m)
    group_levels(m, min_devices=min_devices)
    return m


def _check_duplicate_reads(m: Measurements):
    t = m.t_s if m.t_s is not None else np.zeros(len(m))
    inv, n = group_codes(m.device, t, m.read_id)
    counts = np.bincount(inv, minlength=n)
    if (counts > 1).any():
        same = np.flatnonzero(inv == np.flatnonzero(counts > 1)[0])
        raise UserError(
            f"{m.where(same[1])}: duplicates the read at {m.where(same[0])} "
            "(same device_id, t_s and read_id)")


def group_levels(m: Measurements, min_devices: int = MIN_DEVICES_PER_LEVEL):
    """Set m.level / m.level_g: distinct targets, or equal-count bins for continuous targets.

    Checks that every level has at least `min_devices` devices read at its earliest time.
    """
    dev, n_dev = m.device_keys()
    # one target per device
    dev_target = np.zeros(n_dev)
    dev_target[dev] = m.g_target
    rounded = np.round(m.g_target, 6)
    uniq = np.unique(rounded)
    if len(uniq) <= MAX_DISCRETE_LEVELS:
        m.level = np.searchsorted(uniq, rounded)
        m.level_g = uniq.astype(np.float64)
        m.binned = False
    else:
        n_bins = int(min(MAX_BINS, max(2, n_dev // DEVICES_PER_BIN)))
        if n_dev < 2 * min_devices:
            raise UserError(
                f"{', '.join(m.files)}: column 'g_target_uS': {len(uniq)} distinct targets from only "
                f"{n_dev} devices; need at least {2 * min_devices} devices to bin continuous targets")
        n_bins = min(n_bins, n_dev // min_devices)
        edges = np.quantile(dev_target, np.linspace(0, 1, n_bins + 1))
        edges = np.unique(edges)
        dev_bin = np.clip(np.searchsorted(edges, dev_target, side="right") - 1, 0, len(edges) - 2)
        used = np.unique(dev_bin)
        dev_bin = np.searchsorted(used, dev_bin)
        sums = np.bincount(dev_bin, weights=dev_target)
        cnt = np.bincount(dev_bin)
        m.level = dev_bin[dev]
        m.level_g = sums / cnt
        m.binned = True
    early = m.earliest_mask()
    gi, ng = group_codes(m.level[early], dev[early])
    first = np.zeros(ng, dtype=np.int64)
    first[gi] = m.level[early]
    per_level = np.bincount(first, minlength=len(m.level_g))
    few = np.flatnonzero(per_level < min_devices)
    if len(few):
        lv = few[0]
        rows = np.flatnonzero(m.level == lv)
        where_files = sorted({m.files[m.file_idx[r]] for r in rows})
        what = "bin around" if m.binned else "level"
        raise UserError(
            f"{', '.join(where_files)}: column 'g_target_uS': {what} {m.level_g[lv]:g} uS has "
            f"{per_level[lv]} device(s) at its earliest read (first at line {m.line[rows[0]]}); at least "
            f"{min_devices} are needed to estimate a spread"
            + (f" ({len(few)} levels are short)" if len(few) > 1 else ""))
    return m
