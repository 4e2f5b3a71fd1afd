"""Stale inputs: an artifact records the params it was made with, and the stage that reads it checks them.

DVC reruns a stage when its params change, but a stage run directly (`python -m stages.evaluate`)
would otherwise use an old noise model or old percentiles under the new params' labels.
"""

from __future__ import annotations

import json

from romer.core.errors import UserError


def _get(params, key: str):
    v = params
    for part in key.split("."):
        v = getattr(v, part)
    return v.model_dump() if hasattr(v, "model_dump") else v


def _plain(v):
    return json.loads(json.dumps(v, default=str))  # tuples -> lists, as the JSON on disk holds them


def made_with(params, keys) -> dict:
    """{dotted key: value} of `params`, to store in an artifact ("made_with")."""
    return {k: _plain(_get(params, k)) for k in keys}


def check_made_with(path, recorded: dict | None, params, stage: str):
    """Refuse an artifact made with other values of its params: one line naming the keys and the stage
    to rerun. An artifact without a record (written by an older version) is not checked."""
    if not recorded:
        return
    diff = [(k, v, _plain(_get(params, k))) for k, v in recorded.items()]
    diff = [(k, old, new) for k, old, new in diff if old != new]
    if diff:
        what = "; ".join(f"{k} was {old!r}, params.yaml has {new!r}" for k, old, new in diff[:3])
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise UserError(f"{path} is stale: {what}{more}. Rerun `dvc repro {stage}` (or `dvc repro`)")


def read_input(path, stage: str):
    """An earlier stage's JSON output, or one line saying which stage makes it."""
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: it is made by the {stage} stage; run `dvc repro {stage}` first "
                        "(or `dvc repro`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); rerun `dvc repro {stage}`") from None
