"""One loaded model on simulated CIM hardware: the state every ROMER stage works on.

`Experiment` loads the model, its adapter and the noise model once, keeps the clean weights on the
CPU (inside AnalogWeights), and puts the model into a state in place: clean, noisy (seed), with a
replacement plan, or both. It also builds the routing plan (replacement routing, calibration maps)
for each evaluation method. Nothing is deep-copied.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from romer.cim.mapping import AnalogWeights, ArrayVariation
from romer.cim.noise_models import NoiseModel
from romer.cim.periphery import Periphery, periphery_config
from romer.cim.sources import scale_warning
from romer.core.errors import UserError
from romer.core.paths import MODEL_DIR, NOISE_MODEL
from romer.core.staleness import check_made_with, read_input
from romer.data.text import calib_windows, eval_windows, load_text, tokenize
from romer.methods.calibration import calibrate_maps, collect_logits, compose, make_transform, percentiles
from romer.methods.replacement import pairs_by_layer, routing_fns, weight_edit
from romer.moe.adapters import analog_tensors, get_adapter
from romer.moe.models import check_model_dir, input_device, load_model, load_tokenizer, resolve_device


def noise_label(params, strength: float = 1.0) -> dict:
    """What the noisy numbers were made at: the noise and array settings (eval.json's `noise`)."""
    n, c = params.noise, params.cim
    return {"source": n.source, "prog_scale": n.prog_scale * strength, "read_scale": n.read_scale * strength,
            "drift_scale": n.drift_scale, "strength": strength, "t_inference_s": n.t_inference_s,
            "drift_compensation": n.drift_compensation, "analog": list(c.analog), "tile": c.tile,
            "weight_scaling": c.weight_scaling, "range_crest": c.range_crest, "periphery": c.periphery.model_dump(),
            "variation": c.variation.model_dump()}


def with_strength(params, strength: float):
    """params with noise.prog_scale and noise.read_scale multiplied by `strength` (a sweep point)."""
    n = params.noise
    return params.model_copy(update={"noise": n.model_copy(update={"prog_scale": n.prog_scale * strength,
                                                                   "read_scale": n.read_scale * strength})})


class Experiment:
    def __init__(self, params, model_dir=MODEL_DIR, noise_model_path=NOISE_MODEL, noise_model=None,
                 model=None, tokenizer=None):
        """Load the model and tokenizer from `model_dir`, or take an in-memory `model` (and
        `tokenizer`, needed only for text windows) as they are, on the device they are on."""
        self.params = params
        m = params.model
        if model is None:
            if Path(model_dir) == Path(MODEL_DIR):  # the pipeline's model: made by fetch_model from these params
                check_model_dir(model_dir, params)
            if noise_model is None:  # refuse a stale noise model before loading the weights
                noise_model = self._load_noise_model(noise_model_path)
            self.device = None if m.device_map else resolve_device(m.device)
            model = load_model(model_dir, trust_remote_code=m.trust_remote_code, dtype=m.dtype,
                               device=self.device or "cpu", device_map=m.device_map,
                               allow_missing_weights=m.allow_missing_weights)
            tokenizer = load_tokenizer(model_dir, trust_remote_code=m.trust_remote_code)
        self.model, self.tokenizer = model, tokenizer
        self.device = input_device(model)  # inputs go where the embedding is (device_map too)
        self.model.config.output_router_logits = False
        self.model.requires_grad_(False)  # inference only: weights are edited in place
        self.adapter = get_adapter(self.model)
        self.blocks = self.adapter.blocks(self.model)
        self.num_experts = self.adapter.num_experts(self.blocks[0])
        self.top_k = self.adapter.top_k(self.blocks[0])
        self.layers = [b.layer for b in self.blocks]
        if noise_model is None:
            noise_model = self._load_noise_model(noise_model_path)
        self.noise_model = noise_model
        n = params.noise
        warn = scale_warning(n.source, n.prog_scale, n.read_scale, n.drift_scale)
        if warn:
            print(warn, file=sys.stderr)
        self.analog_kinds = list(params.cim.analog)
        # Routed experts and routers are always held (replacement reprograms them even when digital).
        kinds = sorted(set(self.analog_kinds) | {"routed_experts", "router"})
        tensors = analog_tensors(self.model, self.adapter, kinds)
        cim = params.cim
        self.periphery_config = periphery_config(cim.periphery.preset, **cim.periphery.overrides())
        self.weights = AnalogWeights(tensors, noise_model, tile=cim.tile,
                                     weight_scaling=cim.weight_scaling or self.periphery_config.weight_scaling,
                                     levels=cim.levels, variation=ArrayVariation(**cim.variation.model_dump()),
                                     range_crest=cim.range_crest)
        self.periphery = None
        if not self.periphery_config.ideal:  # the ideal periphery costs nothing: no hooks at all
            self.periphery = Periphery(self.weights, self.periphery_config).install(self.model)
        self._expert_records = [r for r in tensors if r.kind == "routed_experts"]
        self._state_key = None  # what the weights hold now (see set_state)
        self._seed = None

    def _load_noise_model(self, path):
        """The fit_noise stage's noise model, refused when it was made from another noise.source/degree."""
        from romer.cim.stage import NOISE_MODEL_PARAMS

        d = read_input(path, "fit_noise")
        recorded = d.get("made_with") or ({"noise.source": d["source"]} if "source" in d else None)
        if Path(path) == Path(NOISE_MODEL):
            check_made_with(path, {k: v for k, v in (recorded or {}).items() if k in NOISE_MODEL_PARAMS},
                            self.params, "fit_noise")
        return NoiseModel.from_json(d, where=str(path))

    # ---- data ------------------------------------------------------------------------------
    def windows(self, dataset, seq_len, n_seqs=None, max_tokens=None, key="eval"):
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and seq_len > limit:  # positions beyond it are untrained (or an error): refuse before any work
            raise UserError(f"params key '{key}.seq_len': {seq_len} is longer than the model's "
                            f"max_position_embeddings ({limit})")
        ids = tokenize(self.tokenizer, load_text(dataset, self.params.builtin, key=f"{key}.dataset"))
        if n_seqs is not None:
            return calib_windows(ids, n_seqs, seq_len, key=key, allow_overlap=self.params.calib.allow_overlap)
        return eval_windows(ids, seq_len, max_tokens, key=key)

    def calib_windows(self):
        c = self.params.calib
        return self.windows(c.dataset, c.seq_len, n_seqs=c.n_seqs, key="calib")

    # ---- weight states ---------------------------------------------------------------------
    def set_state(self, seed=None, plan=None, scale=None, t_inference_s=None, kinds=None, digital=None):
        """Clean (seed None) or noisy weights, optionally with a replacement plan programmed in.

        scale: noise strength, a multiplier of noise.prog_scale and noise.read_scale (default 1).
        kinds: the analog kinds that get noise (default cim.analog). digital: {layer: [experts]}
        kept digital (clean), for the heterogeneous analog-digital baseline. A noisy state runs its
        matmuls through the periphery, whose noise stream restarts at every call.
        """
        n = self.params.noise
        edit = weight_edit(plan, self.weights.clean_at) if plan and plan["replaced"] else None
        scale = 1.0 if scale is None else float(scale)
        t_inference_s = n.t_inference_s if t_inference_s is None else t_inference_s
        kinds = self.analog_kinds if kinds is None else kinds
        if self.periphery is not None:
            self.periphery.enabled = seed is not None
            self.periphery.column_affine = None  # a column calibration belongs to one method's pass
        # The weights are a pure function of this key, so an unchanged key needs no new noise pass.
        key = json.dumps([seed, plan["layers"] if edit else None, plan["strategy"] if edit else None, scale,
                          t_inference_s, n.model_dump(), sorted(kinds), digital], sort_keys=True, default=str)
        if key != self._state_key:
            self._state_key = key
            if seed is None and edit is None:
                self.weights.restore()
            else:
                self.weights.apply(
                    seed=0 if seed is None else seed,
                    prog_scale=n.prog_scale * scale,
                    read_scale=n.read_scale * scale,
                    drift_scale=n.drift_scale,
                    t_inference_s=t_inference_s,
                    drift_compensation=n.drift_compensation,
                    edit=edit,
                    kinds=[] if seed is None else kinds,
                )
                if digital:
                    self._keep_digital(digital)
        self._seed = seed
        self.restart_periphery()

    def fit_columns(self, windows) -> dict:
        """Digital per-column affine calibration of every analog matmul in the current noisy state
        (the affine_columns baseline): one pass over `windows`, each column's output regressed onto
        the clean weights' exact output for the same input. Installed until the next set_state."""
        if self.periphery is None:
            raise UserError("affine_columns calibrates the periphery's outputs: it needs cim.periphery.preset "
                            "other than ideal")
        c = self.params.calib
        self.periphery.start_column_fit()
        try:
            with torch.no_grad():
                for i in range(0, windows.shape[0], c.batch_size):
                    self.model(windows[i:i + c.batch_size].to(self.device), use_cache=False)
        except BaseException:
            self.periphery._fit = None
            raise
        fit = self.periphery.finish_column_fit()
        self.restart_periphery()
        return fit

    def restart_periphery(self):
        """Restart the periphery's noise stream of the current chip, so that every measurement pass
        after a state change or a calibration pass sees the same stream (paired across methods)."""
        if self.periphery is not None and self._seed is not None:
            self.periphery.reseed(self._seed)

    @torch.no_grad()
    def _keep_digital(self, digital):
        """Put the clean weights back into the given experts (fused [E, out, in] tensors)."""
        for rec in self._expert_records:
            for e in digital.get(rec.layer, []):
                if rec.fused:
                    self.weights.keep_digital(rec.name, e)
                elif rec.expert == e:
                    self.weights.keep_digital(rec.name, 0)

    def expert_array_noise(self, seed):
        """{layer: [E]} mean sigma multiplier of each routed expert's arrays on chip `seed` (what the
        chip-level noise model says about where the good arrays are), or None without cim.variation."""
        sums, counts = {}, {}
        for rec in self._expert_records:
            v = self.weights.array_variation(seed, rec.name)
            if v is None:
                return None
            m = v["sigma_mult"].reshape(v["sigma_mult"].shape[0], -1).mean(dim=1).cpu().double()  # per matrix
            s = sums.setdefault(rec.layer, torch.zeros(self.num_experts, dtype=torch.float64))
            c = counts.setdefault(rec.layer, torch.zeros(self.num_experts, dtype=torch.float64))
            if rec.fused:
                s += m
                c += 1
            else:
                s[rec.expert] += m[0]
                c[rec.expert] += 1
        return {layer: (sums[layer] / counts[layer].clamp(min=1)).tolist() for layer in sums}

    def restore(self):
        self.weights.restore()
        self._state_key = None
        self._seed = None
        if self.periphery is not None:
            self.periphery.enabled = False

    # ---- routing plans ---------------------------------------------------------------------
    def replacement_fns(self, plan) -> dict:
        if not plan or not plan["replaced"]:
            return {}
        return {layer: routing_fns(pairs, plan["strategy"], self.num_experts)
                for layer, pairs in pairs_by_layer(plan).items()}

    def routing_plan(self, plan=None, maps=None) -> dict:
        fns = self.replacement_fns(plan)
        out = {}
        for layer in self.layers:
            mask, post = fns.get(layer, (None, None))
            tr = make_transform(*maps[layer]) if maps and layer in maps else None
            if tr or mask or post:
                out[layer] = compose(tr, mask, post)
        return out

    def logit_percentiles(self, windows, plan=None) -> dict:
        """{layer: [E, 2]} router-logit percentiles in the current weight state."""
        c = self.params.calib
        got = collect_logits(self.model, self.adapter, windows, c.batch_size, self.device,
                             self.routing_plan(plan))
        self.restart_periphery()
        return {layer: percentiles(got[layer], *self.params.calibrate.percentiles) for layer in self.layers}

    def calibrate(self, windows, clean_pct, plan=None, instances=(None,), fit="percentile") -> dict:
        """Affine logit maps for the current noisy state (per_chip) or pooled over `instances`; `fit`
        names how they are fitted (romer.methods.calibration.FITS)."""
        c, cal = self.params.calib, self.params.calibrate
        maps = calibrate_maps(self.model, self.adapter, windows, c.batch_size, self.device, clean_pct,
                              cal.percentiles, layerwise=cal.layerwise,
                              replacement_fns=self.replacement_fns(plan), instances=instances, fit=fit)
        self.restart_periphery()
        return maps
