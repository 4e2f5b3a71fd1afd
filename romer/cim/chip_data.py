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
        n = int(self.device.max()) + 1
        if n <= len(self):
            # Dense codes, as the loader makes them, and one target per device (the usual case): the
            # codes are already the answer; skip the sorts (they cost ~5 copies of a column).
            tgt = np.full(n, np.nan)
            tgt[self.device] = self.g_target
            if not np.isnan(tgt).any() and np.array_equal(tgt[self.device], self.g_target):
                return self.device, n
        return group_codes(self.device, self.g_target)

    def earliest_mask(self):
        """Rows read at the earliest time of their level (all rows when there is no t_s)."""
        if self.t_s is None:
            return np.ones(len(self), dtype=bool)
        tmin = np.full(len(self.level_g), np.inf)
        np.minimum.at(tmin, self.level, self.t_s)
        bound = tmin[self.level]
        bound *= 1 + 1e-9  # t >= tmin always: one bound, not isclose's temporaries
        return self.t_s <= bound


def _codes(c):
    """(dense int codes in sorted order of value, count) of one column."""
    c = np.asarray(c)
    if c.dtype.kind in "iu" and len(c) and c.min() >= 0 and c.max() < 4 * len(c):
        return c, int(c.max()) + 1  # already small ints (device, read, level codes): no sort, no copies
    _, inv = np.unique(c, return_inverse=True)
    inv = inv.reshape(-1)
    return inv, (int(inv.max()) + 1 if len(inv) else 1)


def _compact(key, n_key):
    """Renumber int keys < n_key to 0..k-1 in sorted order (np.unique's inverse, without its sort)."""
    if n_key <= 4 * len(key):
        present = np.zeros(n_key, dtype=bool)
        present[key] = True
        remap = np.cumsum(present) - 1
        return remap[key], int(remap[-1]) + 1 if n_key else 0
    _, inv = np.unique(key, return_inverse=True)
    inv = inv.reshape(-1)
    return inv, (int(inv.max()) + 1 if len(inv) else 0)


def group_codes(*cols):
    """Row -> group index (0..n-1) for rows keyed by equal values in all of `cols` (1D arrays).

    Groups are numbered in lexicographic order of their values. Memory: a few copies of one column
    (a million-row CSV is fitted in ~3x its size).
    """
    if not len(cols[0]):
        return np.zeros(0, dtype=np.int64), 0
    key, n_key = None, 1
    for c in cols:
        inv, n = _codes(c)
        if key is None:
            key, n_key = inv.astype(np.int64, copy=True), n
            continue
        if n_key * n >= 2 ** 62:  # keep the combined key in int64
            key, n_key = _compact(key, n_key)
        key *= n
        key += inv
        n_key *= n
    return _compact(key, n_key)


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


CHUNK_ROWS = 1 << 14  # rows parsed as text before they become arrays: memory stays O(chunk) + 4-8 B per cell
# Line numbers, file indices and id codes are int32 (2^31 rows is far beyond a CSV): 28 B per row in all.


class _Columns:
    """Streaming parse of one CSV into arrays: floats for the numeric columns, int codes for the text ones.

    Rows are converted chunk by chunk, so a file of millions of reads costs its arrays, not Python
    strings per cell. Every check names the file, the line and the column.
    """

    def __init__(self, path, codes):
        # device_id is local to its file: a fresh table, its codes offset past earlier files' devices.
        # read_id means the same repeat index in every file: one shared table.
        self.path = path
        self.code_base = {"device_id": codes.get("n_devices", 0)}
        self.codes = {"device_id": {}, "read_id": codes.setdefault("read_id", {})}
        self.cols = None  # {name: index in the row}
        self.parts = {}  # {name: [arrays]}
        self.buf, self.buf_lines, self.n_rows = [], [], 0

    def header(self, cells):
        header = [c.strip() for c in cells]
        lower = [h.lower() for h in header]
        cols = {}
        for name in REQUIRED + OPTIONAL:
            hits = [i for i, h in enumerate(lower) if h == name.lower()]
            if len(hits) > 1:
                raise UserError(f"{self.path}: column '{name}' appears {len(hits)} times in the header")
            if hits:
                cols[name] = hits[0]
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            hint = ""
            if len(header) == 1 and any(ch in header[0] for ch in ";\t|"):
                hint = " (the delimiter must be a comma)"
            raise UserError(
                f"{self.path}: missing required column(s) {', '.join(repr(c) for c in missing)}{hint}; "
                f"found columns {header}")
        self.width, self.cols = len(header), cols
        self.parts = {name: [] for name in list(cols) + ["line"]}

    def bad_width(self, cells, ln):
        raise UserError(f"{self.path}, line {ln} (data row {self.n_rows + len(self.buf) + 1}): expected "
                        f"{self.width} fields as in the header, got {len(cells)}")

    def flush(self):
        if not self.buf:
            return
        lines = np.asarray(self.buf_lines, dtype=np.int32)
        columns = list(zip(*self.buf))  # transpose in C
        for name, i in self.cols.items():
            values = columns[i]
            if name in NUMERIC:
                arr = self._to_float(name, values, lines)  # numpy's parse ignores surrounding blanks
                self._check_range(name, arr, values, lines)
            else:
                arr = self._to_codes(name, [v.strip() for v in values], lines)
            self.parts[name].append(arr)
        self.parts["line"].append(lines)
        self.n_rows += len(self.buf)
        self.buf, self.buf_lines = [], []

    def _where(self, k, lines, name):
        return f"{self.path}, line {lines[k]} (data row {self.n_rows + k + 1}), column '{name}'"

    def _to_float(self, name, values, lines):
        try:
            arr = np.asarray(values, dtype=np.float64)
        except ValueError:
            for k, v in enumerate(values):  # find the first bad cell, to name it
                try:
                    float(v)
                except ValueError:
                    what = "is empty" if v == "" else f"'{v}' is not a number"
                    raise UserError(f"{self._where(k, lines, name)}: {what}") from None
            raise
        bad = np.flatnonzero(~np.isfinite(arr))
        if len(bad):
            k = bad[0]
            raise UserError(f"{self._where(k, lines, name)}: value '{values[k]}' is not finite")
        return arr

    def _check_range(self, name, arr, values, lines):
        if name == "t_s":
            bad = np.flatnonzero(arr <= 0)
            if len(bad):
                raise UserError(f"{self._where(bad[0], lines, name)}: time {values[bad[0]]} must be > 0 "
                                "(seconds since programming)")
        else:
            bad = np.flatnonzero(arr < 0)
            if len(bad):
                raise UserError(f"{self._where(bad[0], lines, name)}: conductance {values[bad[0]]} is negative; "
                                "conductances must be >= 0 uS")

    def _to_codes(self, name, values, lines):
        if "" in values:
            raise UserError(f"{self._where(values.index(''), lines, name)}: is empty")
        table = self.codes[name]
        out = np.fromiter((table.setdefault(v, len(table)) for v in values), dtype=np.int32, count=len(values))
        out += self.code_base.get(name, 0)
        return out

    def arrays(self):
        """The columns as arrays; parts are freed one column at a time, so the peak is one extra column."""
        out = {}
        for name in list(self.parts):
            parts = self.parts.pop(name)
            out[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            del parts
        return out


def _read_one(path, codes):
    """Parse one CSV into ({column: array}, with 'line': line numbers); text columns become int codes."""
    cols = _Columns(path, codes)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            for cells in reader:  # the header, then data rows (the hot loop: kept inline)
                if not cells or cells[0].lstrip().startswith("#") or (len(cells) == 1 and not cells[0].strip()):
                    continue
                cols.header(cells)
                break
            buf, buf_lines, width = cols.buf, cols.buf_lines, getattr(cols, "width", 0)
            for cells in reader:
                if len(cells) != width:
                    if not cells or cells[0].lstrip().startswith("#") or (len(cells) == 1 and not cells[0].strip()):
                        continue
                    cols.bad_width(cells, reader.line_num)
                elif "#" in cells[0] and cells[0].lstrip().startswith("#"):
                    continue
                buf.append(cells)
                buf_lines.append(reader.line_num)
                if len(buf) >= CHUNK_ROWS:
                    cols.flush()
                    buf, buf_lines = cols.buf, cols.buf_lines
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text CSV file") from None
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV file: {e}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    if cols.cols is None:
        empty = os.path.getsize(path) == 0 or not Path(path).read_bytes().strip()
        raise UserError(f"{path}: empty file "
                        + (f"(expected a header row with columns {', '.join(REQUIRED)})" if empty
                           else "(only comments or blank lines)"))
    cols.flush()
    if not cols.n_rows:
        raise UserError(f"{path}: no data rows after the header")
    codes["n_devices"] = cols.code_base["device_id"] + len(cols.codes["device_id"])
    return cols.arrays()


def load_measurements(paths_or_globs, min_devices: int = MIN_DEVICES_PER_LEVEL) -> Measurements:
    """Read, validate and combine measurement CSVs; group targets into levels.

    Raises UserError (naming the file and line or column) on any problem.
    """
    files = expand_paths(paths_or_globs)
    codes = {}
    parts = [_read_one(path, codes) for path in files]
    optional_sets = [tuple(c for c in OPTIONAL if c in p) for p in parts]
    ref = optional_sets[0]
    for path, opt in zip(files, optional_sets):
        if opt != ref:
            raise UserError(
                f"{path}: has optional columns {list(opt) or 'none'} but {files[0]} has "
                f"{list(ref) or 'none'}; combined CSVs must have the same columns")

    def cat(name):
        if name not in ref and name not in REQUIRED + ("line",):
            return None
        # one file (the usual case): its arrays as they are; a copy would double the memory of a big CSV
        return parts[0][name] if len(parts) == 1 else np.concatenate([p[name] for p in parts])

    m = Measurements(files=files, g_target=cat("g_target_uS"), g_measured=cat("g_measured_uS"),
                     t_s=cat("t_s"), device=cat("device_id"), read_id=cat("read_id"),
                     file_idx=np.concatenate([np.full(len(p["line"]), i, dtype=np.int32) for i, p in enumerate(parts)]),
                     line=cat("line"))
    check_units(m)
    if m.device is not None and m.read_id is not None:
        _check_duplicate_reads(m)
    group_levels(m, min_devices=min_devices)
    return m


# Plausible full scale of a device in uS (PCM, ReRAM, FeFET and flash cells: ~1 to ~1000 uS).
G_MAX_RANGE_US = (0.1, 1e4)
_UNITS = (("S", 1e6), ("mS", 1e3), ("uS", 1.0), ("nS", 1e-3), ("pS", 1e-6))
OUTLIER_FACTOR = 100.0  # a read this many times the largest target is a wrong-unit row, not noise


def check_units(m: Measurements):
    """Refuse data that is not in microsiemens, naming the unit that would fit, and wrong-unit rows."""
    g_max = float(m.g_target.max())
    lo, hi = G_MAX_RANGE_US
    if g_max > 0 and not lo <= g_max <= hi:
        fits = [u for u, f in _UNITS if lo <= g_max * f <= hi and u != "uS"]
        files = ", ".join(m.files)
        raise UserError(
            f"{files}: column 'g_target_uS': the largest target is {g_max:.4g}, outside the {lo:g}-{hi:g} uS of "
            f"real devices: the values do not look like microsiemens"
            + (f"; they fit as {' or '.join(fits)} (multiply by {dict(_UNITS)[fits[0]]:g} to get uS)" if fits else ""))
    if g_max == 0:
        raise UserError(f"{', '.join(m.files)}: column 'g_target_uS': every target is 0; nothing was programmed")
    bad = np.flatnonzero(m.g_measured > OUTLIER_FACTOR * g_max)
    if len(bad):
        shown = "; ".join(f"line {m.line[i]} ({m.g_measured[i]:.4g})" for i in bad[:3])
        raise UserError(
            f"{m.where(bad[0]).split(', line')[0]}: column 'g_measured_uS': {len(bad)} read(s) above "
            f"{OUTLIER_FACTOR:g}x the largest target ({g_max:.4g} uS), e.g. {shown}: a row in another unit? "
            f"Fix or remove these rows")


def _check_duplicate_reads(m: Measurements):
    t = m.t_s if m.t_s is not None else np.zeros(len(m))
    # Sort by (device, t, read) and compare neighbours: O(n) extra memory, no per-column codes.
    order = np.lexsort((m.read_id, t, m.device))  # stable: equal keys keep file order
    same = np.ones(len(m) - 1, dtype=bool)
    for col in (m.device, t, m.read_id):
        c = col[order]
        same &= c[1:] == c[:-1]
        del c
    if same.any():
        k = np.flatnonzero(same)
        k = k[np.argmin(order[k + 1])]  # the first row that repeats an earlier one
        raise UserError(
            f"{m.where(order[k + 1])}: duplicates the read at {m.where(order[k])} "
            "(same device_id, t_s and read_id)")


TARGET_RTOL = 1e-9  # targets this close (relative) are one level: float text noise, not a new level


def _distinct_targets(g):
    """(level per row, level target) for targets equal up to TARGET_RTOL of their size: no absolute rounding,
    so a CSV in any unit groups the same."""
    uniq, inv = np.unique(g, return_inverse=True)
    new = np.ones(len(uniq), dtype=bool)
    new[1:] = np.diff(uniq) > TARGET_RTOL * np.maximum(np.abs(uniq[1:]), np.finfo(float).tiny)
    group = np.cumsum(new) - 1
    return group[inv.reshape(-1)], uniq[new]


def group_levels(m: Measurements, min_devices: int = MIN_DEVICES_PER_LEVEL):
    """Set m.level / m.level_g: distinct targets, or equal-count bins for continuous targets.

    Checks that every level has at least `min_devices` devices read at its earliest time.
    """
    dev, n_dev = m.device_keys()
    # one target per device
    dev_target = np.zeros(n_dev)
    dev_target[dev] = m.g_target
    level, uniq = _distinct_targets(m.g_target)
    if len(uniq) <= MAX_DISCRETE_LEVELS:
        m.level = level
        m.level_g = uniq
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
