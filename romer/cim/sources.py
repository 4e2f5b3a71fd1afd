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


BUNDLED_SAMPLES = ("data/chip/pcm_sample.csv", "data/chip/reram_wan2022_sample.csv",
                   "data/chip/reram_milo2021_sample.csv")


def scale_warning(source: str, prog_scale: float, read_scale: float, drift_scale: float):
    """One line when a user's own noise source runs at scales other than 1 (a stress study, not their chip)."""
    if get_preset(source) is not None or os.path.normpath(source) in BUNDLED_SAMPLES:
        return None
    if (prog_scale, read_scale, drift_scale) == (1.0, 1.0, 1.0):
        return None
    return (f"warning: noise.source '{source}' runs at prog/read/drift scales {prog_scale:g}/{read_scale:g}/"
            f"{drift_scale:g}, not 1: the results are a stress study, not the measured chip")


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
