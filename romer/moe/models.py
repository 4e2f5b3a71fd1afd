"""Model sources: builtin, a local directory, or a Hugging Face hub id (pinned revision).

`fetch_model` materialises the source as `models/model`: the builtin model's weights, or a small
`source.json` pointer for local and hub models (so DVC does not copy 30 GB of weights). Weights
load from safetensors only.

A local directory's pointer carries the sha256 of its model files (romer.core.provenance). DVC cannot
see a directory it does not track, so the hash is pinned in params.yaml as `model.revision` (as a hub
model pins its commit): changing the pin reruns fetch_model and every later stage, fetch_model refuses
weights that do not match it, and every load through the pointer refuses weights that changed after
fetch_model recorded them.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch

from romer.core.errors import UserError
from romer.core.io import atomic_path
from romer.core.paths import MODEL_DIR
from romer.core.provenance import model_files_sha256

BUILTIN_DIR = Path(MODEL_DIR)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _hub_hint(repo_id):
    return (
        f"cannot reach the Hugging Face hub to get model '{repo_id}'. The hub is unreachable from this "
        f"machine (or HF_HUB_OFFLINE is set). Download the model where the hub is reachable "
        f"(e.g. `huggingface-cli download {repo_id} --revision <commit>`, or save_pretrained), copy the "
        f"directory here, and set model.source in params.yaml to that local directory."
    )


def _download(repo_id, revision):
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.tiktoken"],
            etag_timeout=10,
        )
    except Exception as e:  # connection, DNS, offline mode, missing repo: all end the same way
        name = type(e).__name__
        if "RepositoryNotFound" in name or "RevisionNotFound" in name:
            raise UserError(f"model '{repo_id}' revision {revision!r} not found on the hub ({name})") from None
        raise UserError(_hub_hint(repo_id) + f" [{name}]") from None


def resolve_source(source: str, revision=None) -> Path:
    """A local directory holding config.json (+ safetensors) for any model source."""
    if source == "builtin":
        if not BUILTIN_DIR.is_dir():
            raise UserError(f"the builtin model is not trained yet: {BUILTIN_DIR} does not exist in {Path.cwd()}. "
                            "Run `make repro` (or `dvc repro fetch_model`) in the repo root, and run from there")
        source = str(BUILTIN_DIR)
    p = Path(source)
    if p.is_dir():
        pointer = p / "source.json"
        if pointer.is_file():
            ref = json.loads(pointer.read_text())
            if ref["kind"] == "hub":
                return Path(_download(ref["id"], ref["commit"] or ref["revision"]))
            return _verified_local(ref)
        if not (p / "config.json").is_file():
            raise UserError(f"model directory {p} has no config.json (expected a save_pretrained directory)")
        return p
    if p.exists():
        raise UserError(f"model source {p} is a file; expected a model directory or a hub id")
    if source.startswith((".", "/", "~")) or not HUB_ID.match(source):
        raise UserError(f"model source '{source}' is neither an existing directory nor a hub id (owner/name)")
    return Path(_download(source, revision))


_VERIFIED: dict = {}  # (path, sha256) -> file stats at the last check: each process hashes a model once


def _stats(path: Path):
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))


def _verified_local(ref) -> Path:
    """The local model directory of a source.json pointer, after checking that its model files still have
    the sha256 fetch_model recorded (a pointer without one, from an older fetch_model, is not checked)."""
    path = resolve_source(ref["path"])
    want = ref.get("sha256")
    if want is None:
        return path
    key = (str(path.resolve()), want)
    stats = _stats(path)
    if _VERIFIED.get(key) != stats:
        got = model_files_sha256(path)
        if got != want:
            raise UserError(
                f"the model files in {ref['path']} changed since fetch_model recorded them (sha256 {want[:12]}..., "
                f"now {got[:12]}...): results would not match dvc.lock. To use the new weights set "
                f"model.revision: {got} in params.yaml and run `dvc repro`"
            )
        _VERIFIED[key] = stats
    return path


def load_model(source="builtin", revision=None, trust_remote_code=False, dtype="float32", device="cpu",
               device_map=None, allow_missing_weights=False):
    """Load a causal LM in eval mode (safetensors only). Raises UserError on any bad input.

    device_map ("auto", ...): accelerate places the layers over the GPUs, then the CPU, and
    `device` is ignored; for a model larger than one GPU.
    allow_missing_weights: load even when the weights miss tensors the config asks for (transformers
    initialises them randomly) or hold tensors it does not; otherwise that is an error naming them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise UserError(f"model.device_map: {device_map!r} needs the accelerate package "
                            "(pip install accelerate)") from None

    path = resolve_source(source, revision)
    if not any(path.glob("*.safetensors")):
        raise UserError(f"model directory {path} has no *.safetensors weights (only safetensors are loaded)")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(
                f"model at {path} needs remote code; set model.trust_remote_code: true only if you trust it"
            ) from None
        raise UserError(f"model at {path}: cannot read config.json: {e}") from None
    except Exception as e:
        raise UserError(f"model at {path}: cannot read config.json: {e}") from None
    config.output_router_logits = False
    from romer.moe.adapters import SUPPORTED

    known = {t for types in SUPPORTED.values() for t in types}
    if config.model_type not in known:  # refuse before reading gigabytes of weights
        supported = ", ".join(f"{f} (model_type {'/'.join(t)})" for f, t in SUPPORTED.items())
        raise UserError(f"model at {path}: unsupported model family {config.model_type!r}. "
                        f"Supported families: {supported}")
    kwargs = dict(config=config, trust_remote_code=trust_remote_code, use_safetensors=True,
                  dtype=DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    if not trust_remote_code:
        kwargs["experts_implementation"] = pick_experts_implementation(device)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as e:
        raise UserError(f"model at {path}: cannot load weights ({type(e).__name__}: {str(e)[:300]})") from None
    _check_loading_info(path, info, allow_missing_weights)
    if device_map is not None:
        return model.eval()  # accelerate has placed (and hooked) every layer
    return model.to(resolve_device(device)).eval()


def _check_loading_info(path, info, allow):
    """Missing weights would be random, unexpected ones ignored: both mean the weights are not this config's
    model (e.g. a config that claims more layers than the weights hold)."""
    problems = [(what, sorted(info.get(key) or [])) for what, key in
                (("missing from the weights (they would be randomly initialised)", "missing_keys"),
                 ("in the weights but not in the model", "unexpected_keys"),
                 ("of another shape than the config's", "mismatched_keys"))]
    problems = [(what, [str(k[0]) if isinstance(k, tuple) else str(k) for k in keys]) for what, keys in problems if keys]
    if not problems:
        return
    text = "; ".join(f"{len(keys)} tensor(s) {what}: {', '.join(keys[:4])}" + (", ..." if len(keys) > 4 else "")
                     for what, keys in problems)
    if allow:
        print(f"warning: model at {path}: {text} (model.allow_missing_weights: true)", file=sys.stderr)
        return
    raise UserError(f"model at {path}: the weights do not match config.json: {text}. Fix the model directory, "
                    "or set model.allow_missing_weights: true to load it anyway (for debugging only)")


def check_model_dir(model_dir, params):
    """The model directory fetch_model made must exist and be what params' model.* (and builtin.*) say;
    else one line naming the stale keys and `dvc repro fetch_model`."""
    from romer.core.staleness import check_made_with

    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"{d} not found in {Path.cwd()}: it is made by the fetch_model stage; run "
                        "`dvc repro fetch_model` first (or `dvc repro`), from the repo root")
    m = params.model
    pointer = d / "source.json"
    if pointer.is_file():
        ref = json.loads(pointer.read_text())
        have = ref.get("path") if ref.get("kind") == "local" else ref.get("id")
        same = m.source != "builtin" and (os.path.normpath(str(have)) == os.path.normpath(m.source))
        recorded = {"model.source": m.source if same else have}
        if ref.get("kind") == "hub":
            recorded["model.revision"] = ref.get("revision")
        elif m.revision is not None:
            recorded["model.revision"] = ref.get("sha256")
        check_made_with(d, recorded, params, "fetch_model")
        return
    if m.source != "builtin":
        check_made_with(d, {"model.source": "builtin"}, params, "fetch_model")
    report = d / "builtin_report.json"
    if report.is_file():
        cfg = json.loads(report.read_text()).get("config") or {}
        check_made_with(d, {f"builtin.{k}": v for k, v in cfg.items() if k in type(params.builtin).model_fields},
                        params, "fetch_model")


def input_device(model) -> torch.device:
    """Where input ids go: the device of the token embedding (the first layer under a device_map)."""
    return model.get_input_embeddings().weight.device


def pick_experts_implementation(device) -> str:
    """grouped_mm is the fastest experts kernel on CPU and GPU (DESIGN, performance anchors)."""
    return "grouped_mm"


def resolve_device(device="auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device is 'cuda' but no CUDA device is available")
    return device


def load_tokenizer(source="builtin", revision=None, trust_remote_code=False):
    from transformers import AutoTokenizer

    path = resolve_source(source, revision)
    # without its files transformers builds an empty tokenizer of the model type, and every text is ~0 tokens
    if not any((path / f).is_file() for f in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise UserError(f"model at {path} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
                        "copy them from where the model came from")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"model at {path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    if len(tok) < 16:
        raise UserError(f"model at {path}: the tokenizer has only {len(tok)} tokens; its files are incomplete")
    return tok


def fetch_external(model_params, out_dir=BUILTIN_DIR):
    """Write models/model/source.json for a local or hub source, after checking it loads.

    A local source: the pointer records the sha256 of its model files; `model.revision`, if set, must be
    that sha256 (the pin DVC sees, as params are deps of fetch_model)."""
    source = model_params.source
    src, out = Path(source).resolve(), Path(out_dir).resolve()
    if Path(source).exists() and (src == out or out in src.parents or src in out.parents):
        raise UserError(f"params key 'model.source': {source} is (or holds) fetch_model's own output {out_dir}, "
                        "which fetch_model replaces; point it at the model's own directory")
    if Path(source).exists() and not Path(source).is_dir():
        raise UserError(f"params key 'model.source': {source} is a file; expected a model directory "
                        "(save_pretrained), a hub id (owner/name) or builtin")
    if Path(source).is_dir():
        resolve_source(source)  # a model directory (config.json), not a pointer or something else
        digest = model_files_sha256(source)
        pin = model_params.revision
        if pin is not None and pin != digest:
            raise UserError(
                f"params key 'model.revision': the model files in {source} have sha256 {digest}, not the pinned "
                f"{pin}: the weights changed. If the change is intended, set model.revision: {digest}"
            )
        if pin is None:
            print(f"note: pin the local model in params.yaml with model.revision: {digest} (its sha256); "
                  f"then a change of its weights stops the pipeline instead of going unnoticed by DVC")
        ref = {"kind": "local", "path": source, "sha256": digest}
    else:
        if model_params.revision is None:
            raise UserError(
                f"params key 'model.revision': pin a revision (commit hash or tag) for hub model '{source}' "
                f"so the run is reproducible"
            )
        path = resolve_source(source, model_params.revision)
        ref = {"kind": "hub", "id": source, "revision": model_params.revision, "commit": path.name,
               "sha256": model_files_sha256(path)}  # recorded for provenance; the commit pins the files
    # Validate now (structure only: meta device, no weights read) so later stages fail less.
    from transformers import AutoConfig, AutoModelForCausalLM

    from romer.moe.adapters import get_adapter

    cfg = AutoConfig.from_pretrained(resolve_source(source, model_params.revision),
                                     trust_remote_code=model_params.trust_remote_code)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg, trust_remote_code=model_params.trust_remote_code)
    get_adapter(m)
    with atomic_path(out_dir, is_dir=True) as tmp:
        tmp.mkdir()
        (tmp / "source.json").write_text(json.dumps(ref, indent=2) + "\n")
    return ref
