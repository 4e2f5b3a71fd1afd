"""Typed schema for params.yaml, validated at the start of every stage.

An unknown key, a wrong type, an out-of-range value or a missing file raises UserError with a
message that names the key (dotted, e.g. `calibrate.percentiles`) and what was expected.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from romer.core.errors import UserError

ANALOG_KINDS = ("routed_experts", "shared_experts", "attention", "router", "dense_mlp")


class _Section(BaseModel):
    # allow_inf_nan=False: a NaN or inf anywhere (lists too) is refused, never carried into a run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _unique(v, what="values"):
    dup = sorted({x for x in v if v.count(x) > 1})
    if dup:
        raise ValueError(f"{what} must not repeat (repeated: {dup}): a repeated seed is the same chip counted twice")
    return v


class ModelParams(_Section):
    source: str = "builtin"  # builtin | hub id | local directory
    # Hub id: the commit or tag (required). Local directory: optionally the sha256 of its model files
    # (fetch_model prints it); pinned here, a change of the weights is a param change DVC sees.
    revision: Optional[str] = None
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Spread a model larger than one GPU over the GPUs (then the CPU) with accelerate; `device` is
    # then ignored. null: the whole model on `device`.
    device_map: Optional[Literal["auto", "balanced", "balanced_low_0", "sequential"]] = None
    # Weights the checkpoint lacks (or has in the wrong shape) are an error: transformers would
    # silently initialise them at random. true: load anyway, with a warning that names them.
    allow_missing_weights: bool = False


class BuiltinParams(_Section):
    """Corpus, tokenizer and training recipe of the embedded OLMoE-architecture model.

    The defaults are the measured recipe of docs/builtin_model.md (about 7 minutes on 2 CPU cores).
    """

    corpus_dir: str = "data/corpus"
    val_frac: float = Field(0.05, gt=0, lt=0.5)
    test_frac: float = Field(0.05, gt=0, lt=0.5)
    split_chunks: int = Field(10, ge=1)  # held-out text is taken from this many places in the corpus
    max_chars: Optional[int] = Field(None, gt=0)  # cap the corpus (tests use a small slice)
    vocab_size: int = Field(4096, ge=260)
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(2, gt=0)
    num_experts: int = Field(64, ge=2)
    top_k: int = Field(8, ge=1)
    intermediate_size: int = Field(32, gt=0)  # per routed expert
    # Family of the builtin model (beyond/dvc.yaml trains the others on the same corpus and recipe).
    family: Literal["olmoe", "qwen2_moe", "deepseek_moe", "deepseek_v3"] = "olmoe"
    # Shared experts of intermediate_size each (deepseek_moe, deepseek_v3: >= 1); qwen2_moe has one
    # sigmoid-gated shared expert of shared_experts x intermediate_size (Qwen1.5-MoE: 4 x 1408).
    shared_experts: int = Field(0, ge=0)
    # deepseek_moe, deepseek_v3: the first layers have a dense MLP instead of experts, of the active
    # width of an MoE layer, (top_k + shared_experts) x intermediate_size (DeepSeek-MoE-16B: 1 layer).
    first_dense_layers: int = Field(0, ge=0)
    n_group: int = Field(1, ge=1)  # deepseek_v3: expert groups of group-limited top-k
    topk_group: int = Field(1, ge=1)  # deepseek_v3: groups a token may pick experts from
    bias_update_rate: float = Field(0.001, ge=0)  # deepseek_v3: aux-loss-free balancing step of the correction bias
    tie_embeddings: bool = False
    experts_implementation: Literal["grouped_mm", "eager"] = "grouped_mm"
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(8, gt=0)
    steps: int = Field(1800, gt=0)
    lr: float = Field(5e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_frac: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    aux_loss_coef: float = Field(0.03, ge=0)  # per-layer Switch load-balancing loss
    z_loss_coef: float = Field(0.001, ge=0)  # router z-loss, as OLMoE
    eval_every: Optional[int] = Field(300, gt=0)  # validation-loss probe every N steps (None: at the end)
    eval_windows: int = Field(32, gt=0)  # windows of the validation probe during training
    eval_tokens: Optional[int] = Field(None, gt=0)  # cap on the val/test tokens of the final report
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("hidden_size / num_heads must be even (rotary embeddings)")
        if self.val_frac + self.test_frac >= 0.5:
            raise ValueError("val_frac + test_frac must be < 0.5")
        if self.family == "olmoe" and self.shared_experts:
            raise ValueError("shared_experts must be 0 for family olmoe (OLMoE has no shared experts)")
        if self.first_dense_layers and self.family not in ("deepseek_moe", "deepseek_v3"):
            raise ValueError(f"first_dense_layers must be 0 for family {self.family} (only deepseek_moe and "
                             f"deepseek_v3 have dense first layers)")
        if self.first_dense_layers >= self.num_layers:
            raise ValueError(f"first_dense_layers ({self.first_dense_layers}) must be < num_layers "
                             f"({self.num_layers}): at least one layer must be MoE")
        if self.family in ("qwen2_moe", "deepseek_moe", "deepseek_v3") and self.shared_experts < 1:
            raise ValueError(f"family {self.family} needs shared_experts >= 1")
        if self.family == "deepseek_v3":
            if self.num_experts % self.n_group:
                raise ValueError(f"num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
            per_group = self.num_experts // self.n_group
            if self.topk_group > self.n_group or self.top_k > self.topk_group * per_group or per_group < 2:
                raise ValueError(f"deepseek_v3 needs topk_group <= n_group, top_k <= topk_group * experts per group "
                                 f"and >= 2 experts per group (got n_group {self.n_group}, topk_group "
                                 f"{self.topk_group}, top_k {self.top_k}, {per_group} experts per group)")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        return self


class NoiseParams(_Section):
    """Device noise (docs/noise.md). The scales are aihwkit's: 1 is the measured (or published) strength."""

    source: str = "data/chip/pcm_sample.csv"  # CSV path/glob (fitted) or preset name
    degree: int = Field(2, ge=0, le=6)
    prog_scale: float = Field(1.0, ge=0, allow_inf_nan=False)  # multiplies the programming-noise sigma
    read_scale: float = Field(1.0, ge=0, allow_inf_nan=False)  # multiplies the read-noise sigma
    drift_scale: float = Field(1.0, ge=0, allow_inf_nan=False)  # multiplies the drift exponent nu itself
    t_inference_s: float = Field(86400.0, gt=0, allow_inf_nan=False)
    drift_compensation: bool = True


class PeripheryParams(_Section):
    """ADC/DAC periphery of every analog matmul (romer/cim/periphery.py): a preset, and explicit keys
    that override it (null: the preset's value)."""

    preset: Literal["ideal", "aihwkit-io-default", "aihwkit-hwa"] = "aihwkit-io-default"
    inp_res: Optional[float] = Field(None, ge=0, lt=1, allow_inf_nan=False)  # DAC: 1/steps of [-inp_bound, inp_bound]
    inp_bound: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    noise_management: Optional[Literal["abs_max", "std", "none"]] = None
    nm_std_alpha: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    out_res: Optional[float] = Field(None, ge=0, lt=1, allow_inf_nan=False)  # ADC: 1/steps of [-out_bound, out_bound]
    out_bound: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    out_noise: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    bound_management: Optional[Literal["iterative", "none"]] = None
    w_noise: Optional[float] = Field(None, ge=0, allow_inf_nan=False)  # per-MVM weight read noise (PCM_READ)

    def overrides(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}


class VariationParams(_Section):
    """Array-to-array variation, a seeded chip-level model (romer.cim.mapping.ArrayVariation); 0: off."""

    sigma_spread: float = Field(0.0, ge=0, allow_inf_nan=False)
    gain_std: float = Field(0.0, ge=0, allow_inf_nan=False)
    offset_std: float = Field(0.0, ge=0, allow_inf_nan=False)
    stuck_frac: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)


class CimParams(_Section):
    analog: list[str] = Field(default_factory=lambda: list(ANALOG_KINDS))
    tile: Optional[list[int]] = Field(default_factory=lambda: [512, 512])  # [rows (inputs), cols (outputs)]
    weight_scaling: Optional[Literal["row", "tile"]] = None  # null: the periphery preset's mapping
    # full scale at max(abs-max, range_crest * rms) of the scaled weights (null: abs-max): docs/noise.md
    range_crest: Optional[float] = Field(12.0, gt=0, allow_inf_nan=False)
    levels: Optional[int] = Field(None, ge=2)
    periphery: PeripheryParams = Field(default_factory=PeripheryParams)
    variation: VariationParams = Field(default_factory=VariationParams)

    @field_validator("analog")
    @classmethod
    def _kinds(cls, v):
        bad = [k for k in v if k not in ANALOG_KINDS]
        if bad:
            raise ValueError(f"unknown analog kind(s) {bad}; expected a subset of {list(ANALOG_KINDS)}")
        if len(set(v)) != len(v):
            raise ValueError("analog kinds must not repeat")
        return v

    @field_validator("tile")
    @classmethod
    def _tile(cls, v):
        if v is not None and (len(v) != 2 or min(v) < 1):
            raise ValueError(f"expected [rows, cols] of one array, both >= 1 (or null), got {v}")
        return v


class CalibParams(_Section):
    dataset: str = "builtin-train"  # builtin-train | builtin-validation | local text file | hub dataset
    n_seqs: int = Field(64, gt=0)
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(16, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [100, 101, 102], min_length=1)
    # n_seqs x seq_len more tokens than the calibration text holds: an error, unless true (windows
    # then overlap, and the calibration sees the same tokens more than once).
    allow_overlap: bool = False

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        return _unique(v, "seeds")


class ReplaceParams(_Section):
    tau: float = Field(0.25, ge=0)
    max_per_layer: int = Field(2, ge=0)
    strategy: Literal["copy_router", "split", "average"] = "split"
    # coldest | least_noisy: which underactivated slots get the copies (least_noisy needs cim.variation)
    placement: Literal["coldest", "least_noisy"] = "coldest"


class CalibrateParams(_Section):
    percentiles: tuple[float, float] = (5.0, 95.0)
    mode: Literal["per_chip", "expected"] = "per_chip"
    layerwise: bool = True
    # romer_plus: ridge strength of the per-chip router refit, relative to trace(X^T X) / hidden size
    # (romer.methods.router_refit; chosen on validation, benchmarks/results/ablation_plus.json)
    refit_alpha: float = Field(1e-4, ge=0, allow_inf_nan=False)

    @field_validator("percentiles", mode="before")
    @classmethod
    def _pair(cls, v):
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError("expected [lo, hi]: two percentiles in (0, 100)")
        return v

    @field_validator("percentiles")
    @classmethod
    def _pct(cls, v):
        lo, hi = v
        if not (0 < lo < 100 and 0 < hi < 100):
            raise ValueError(f"percentiles must lie in (0, 100), got {list(v)}")
        if not lo < hi:
            raise ValueError(f"percentiles need lo < hi, got {list(v)}")
        return v


class EvalParams(_Section):
    dataset: str = "builtin-test"  # builtin-test | builtin-validation | local text file | wikitext2
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(8, gt=0)
    max_tokens: Optional[int] = Field(32768, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    tasks: list[str] = Field(default_factory=lambda: ["builtin_cloze"])
    task_limit: Optional[int] = Field(200, gt=0)
    # heterogeneous analog-digital baseline: fractions of experts per layer kept digital (besides
    # the matched budget, which equals the fraction of experts ROMER rewrites)
    hetero_fractions: list[float] = Field(default_factory=lambda: [0.125, 0.25])

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        return _unique(v, "seeds")

    @field_validator("hetero_fractions")
    @classmethod
    def _fracs(cls, v):
        if any(not 0 < f <= 1 for f in v):
            raise ValueError(f"fractions must lie in (0, 1], got {v}")
        return v


class BeyondParams(_Section):
    """Beyond-the-paper stages (beyond/dvc.yaml): noise-strength sweep and drift over deployment time."""

    # noise strengths: multipliers of noise.prog_scale and noise.read_scale (a stress study beyond 1)
    scales: list[float] = Field(default_factory=lambda: [0.5, 1, 2, 3, 4, 6], min_length=1)
    drift_times_s: list[float] = Field(default_factory=lambda: [3600, 86400, 2592000, 31536000], min_length=1)
    # Other MoE families trained like the builtin model: {name: builtin overrides (family, shared_experts, ...)}.
    families: dict[str, dict] = Field(default_factory=lambda: {
        "qwen2_moe": {"family": "qwen2_moe", "num_experts": 60, "top_k": 4, "shared_experts": 4},
        "deepseek_moe": {"family": "deepseek_moe", "top_k": 6, "shared_experts": 2, "first_dense_layers": 1},
        "deepseek_v3": {"family": "deepseek_v3", "shared_experts": 1, "n_group": 8, "topk_group": 4},
    })

    @field_validator("families")
    @classmethod
    def _families(cls, v):
        for name, over in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"family name {name!r} must be letters, digits, '_' or '-'")
            bad = set(over) - set(BuiltinParams.model_fields)
            if bad:
                raise ValueError(f"families.{name}: unknown builtin key(s) {sorted(bad)}")
        return v

    @field_validator("scales", "drift_times_s")
    @classmethod
    def _positive(cls, v):
        if any(x <= 0 for x in v):
            raise ValueError(f"values must be > 0, got {v}")
        return v


class NumericsParams(_Section):
    """Numerical modes that make a run byte-identical across CPUs (romer/core/numerics.py)."""

    # Intra-op threads of every stage. Reductions and MKL split their work by thread, so the same
    # count is part of what a rerun elsewhere must match; 2 is the CI machine's core count.
    threads: int = Field(2, gt=0)


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class MlflowParams(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "romer"
    enabled: bool = True

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v):
        # MLflow would take a plain word for a file store (deprecated, with a page of warnings).
        scheme, sep, rest = v.partition("://")
        expected = ("expected sqlite:///FILE.db, http(s)://HOST:PORT of an `mlflow server`, or a database URI "
                    "(postgresql://...)")
        if not sep or scheme.split("+")[0] not in TRACKING_SCHEMES:
            raise ValueError(f"not a tracking URI; {expected}")
        if scheme == "sqlite" and (not rest.startswith("/") or not rest.strip("/")):
            raise ValueError(f"a sqlite URI needs three slashes and a file: sqlite:///mlflow.db; {expected}")
        return v


class Params(_Section):
    model: ModelParams = Field(default_factory=ModelParams)
    builtin: BuiltinParams = Field(default_factory=BuiltinParams)
    noise: NoiseParams = Field(default_factory=NoiseParams)
    cim: CimParams = Field(default_factory=CimParams)
    calib: CalibParams = Field(default_factory=CalibParams)
    replace: ReplaceParams = Field(default_factory=ReplaceParams)
    calibrate: CalibrateParams = Field(default_factory=CalibrateParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    beyond: BeyondParams = Field(default_factory=BeyondParams)
    numerics: NumericsParams = Field(default_factory=NumericsParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)

    def family_builtin(self, name: str) -> BuiltinParams:
        """The builtin recipe with beyond.families[name] applied (validated as a whole)."""
        if name not in self.beyond.families:
            raise UserError(f"beyond.families has no family {name!r} (has: {', '.join(self.beyond.families) or 'none'})")
        try:
            return BuiltinParams(**{**self.builtin.model_dump(), **self.beyond.families[name]})
        except ValidationError as e:
            raise UserError(_format_error(f"params key 'beyond.families.{name}'", e)) from None


def _format_error(path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key '{key}'")
        else:
            got = e.get("input")
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: key '{key}': {msg} (got {got!r})")
    return "\n  ".join(lines)


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey((key_node, seen[key], key))
            seen[key] = key_node
        return super().construct_mapping(node, deep)


def _key_paths(node, prefix=""):
    """(dotted key, key node) of every mapping key in a composed YAML tree."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            name = f"{prefix}{k.value}"
            yield name, k
            yield from _key_paths(v, name + ".")
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            yield from _key_paths(v, f"{prefix}{i}.")


def _parse_yaml(path: Path, text: str):
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as e:
        second, first, _ = e.args[0]
        # Name the key by its dotted path: compose the tree again and find the node at that place.
        where = (second.start_mark.line, second.start_mark.column)
        name = next((n for n, k in _key_paths(yaml.compose(text, Loader=yaml.SafeLoader))
                     if (k.start_mark.line, k.start_mark.column) == where), str(second.value))
        raise UserError(f"{path}: key '{name}' is given twice (lines {first.start_mark.line + 1} and "
                        f"{second.start_mark.line + 1}); YAML would silently keep the last one. "
                        f"Delete one of them.") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None


def load_params(path="params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file not found: {path}")
    raw = _parse_yaml(path, path.read_text())
    if raw is None:
        raise UserError(f"{path}: is empty; expected the sections of params.yaml (model, noise, cim, ...). "
                        f"`git checkout {path.name}` restores the committed defaults.")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise UserError(_format_error(path, e)) from None
    missing = [name for name in Params.model_fields if name not in raw]
    if missing:
        # A partial file is allowed (tests, quick experiments) but never silently.
        print(f"note: {path} has no section(s) {', '.join(missing)}: using their defaults", file=sys.stderr)
    return params


def flatten(d, prefix=""):
    """Flatten nested dicts with dots: {'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
