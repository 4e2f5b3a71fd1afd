"""Where a noise model comes from: a preset name, a noise-model JSON, or measurement CSVs (fitted).

Kept apart from noise_models (the device law) and noise_fit (the fit), which both import the law, so
neither has to import the other.
"""

from __future__ import annotations

import json
import os

from romer.cim.chip_data import expand_paths, load_measurements
from romer.cim.noise_fit import fit_noise
from romer.cim.noise_models import PRESETS, NoiseModel, get_preset
from romer.core.errors import UserError


def load_noise_model(path) -> NoiseModel:
    """Load a noise-model JSON written by `romer fit-noise` or the fit_noise stage."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    return NoiseModel.from_json(d, where=str(path))


def resolve_noise_model(source: str, degree: int = 2) -> NoiseModel:
    """A preset name ('gaussian:F' too), a noise-model .json, or a CSV path/glob (fitted)."""
    key = "params key 'noise.source'"
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"{key}: empty; give a preset ({', '.join(PRESETS)}) or a CSV path/glob")
    preset = get_preset(source)
    if preset is not None:
        return preset
    if source.endswith(".json") and not any(c in source for c in "*?["):
        if not os.path.isfile(source):
            raise UserError(f"{key}: file not found: {source}")
        return load_noise_model(source)
    try:
        files = expand_paths(source)
    except UserError as e:
        raise UserError(f"{key}: {e} (and it is not a preset: {', '.join(PRESETS)}, gaussian:F)") from None
    fit = fit_noise(load_measurements(files), degree=degree)
    return NoiseModel.from_json(fit, where=source)
