"""Atomic output writing: a killed or failed stage never leaves a file that looks complete.

Each output is written to a temp path next to it and renamed into place. Inside `staged_outputs()`
(every stage runs in one) the renames wait for the end of the block, so a stage that fails part-way
leaves all of its old outputs as they were, not new and stale files mixed.
"""

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from romer.core.errors import UserError

# errors of the place written to (not of the code): one line naming the output, no traceback
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                 errno.EDQUOT, errno.EEXIST, errno.ENAMETOOLONG}

_staged = None  # [(temp dir, written path, final path)] while a staged_outputs() block runs


def write_error(path, e: OSError) -> UserError:
    return UserError(f"cannot write {path}: {e.strerror or e}")


def check_output(path, is_dir=False):
    """Refuse an output path that cannot be written without harm: under a regular file, or an existing
    directory where a file is expected (writing would delete it, and it may hold the inputs)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {path}: {parent} is a file, not a directory")
            break
    if path.is_dir() and not path.is_symlink() and not is_dir:
        raise UserError(f"cannot write {path}: it is an existing directory (expected a file path); "
                        "nothing was deleted")
    if is_dir and path.exists() and not path.is_dir():
        raise UserError(f"cannot write {path}: it is an existing file (expected a directory path)")


def _move_into_place(target: Path, path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(target, path)


@contextmanager
def atomic_path(path, is_dir=False):
    """Yield a temp path next to `path`; move it onto `path` only if the block succeeds.

    is_dir: the output is a directory (the block creates it at the temp path) and replaces an existing
    one; a file output never replaces a directory.
    """
    path = Path(path)
    check_output(path, is_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pending = {str(t) for t, _, _ in _staged or []}
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run
            if str(stale) not in pending:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise write_error(path, e) from None
    target = tmp / path.name
    keep = False
    try:
        try:
            yield target
        except OSError as e:
            if e.errno in _WRITE_ERRNOS:
                raise write_error(path, e) from None
            raise
        if _staged is not None:
            _staged.append((tmp, target, path))
            keep = True
        else:
            _move_into_place(target, path)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_outputs():
    """Every atomic_path/write_json in the block is moved into place at its end, and only if the whole
    block succeeds; on any failure (or Ctrl-C) the temps are removed and the old outputs stay."""
    global _staged
    if _staged is not None:  # nested: the outer block commits
        yield
        return
    _staged = []
    try:
        yield
        commit_outputs()
    finally:
        for tmp, _, _ in _staged:
            shutil.rmtree(tmp, ignore_errors=True)
        _staged = None


def commit_outputs():
    """Move the outputs staged so far into place: for work at the end of a stage that reads them back
    (MLflow logging). No-op outside staged_outputs()."""
    if not _staged:
        return
    for tmp, target, path in _staged:
        _move_into_place(target, path)
        shutil.rmtree(tmp, ignore_errors=True)
    _staged.clear()


def write_json(path, obj):
    """Write JSON atomically with stable formatting (sorted keys are NOT used: order is meaningful)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path):
    return json.loads(Path(path).read_text())
