"""MoE family adapters: one small interface over the module layouts of each family.

An adapter finds the MoE blocks of a model, their router, routed-expert tensors and shared experts,
and re-implements the family's routing (logits -> top-k weights and indices) exactly, so that the
router logits can be rewritten before top-k by a forward hook (see romer/moe/routing.py).

Adding a family means adding one Adapter subclass and registering it in ADAPTERS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from romer.core.errors import UserError
from romer.core.records import AnalogTensor


@dataclass
class MoEBlock:
    layer: int  # index of the decoder layer
    module: nn.Module  # the MoE block (router + experts [+ shared experts])
    router: nn.Module  # has .weight [E, H]
    experts: nn.Module  # fused 3D parameters, or a ModuleList of per-expert MLPs
    shared: list = field(default_factory=list)  # dense shared-expert modules (incl. their gates)


def _linear_weights(module: nn.Module, prefix: str = ""):
    """(name, weight) of every nn.Linear under module, named `prefix.path.weight`."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            yield ".".join(x for x in (prefix, name, "weight") if x), m.weight


def decoder_layers(model: nn.Module):
    """The decoder layer list of a causal LM (model.model.layers in every supported family)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and hasattr(m[0], "self_attn"):
            return m
    raise UserError("could not find the decoder layers (expected model.model.layers)")


class Adapter:
    """Base adapter for the transformers 5.x layout: `layer.mlp.gate` (router module returning
    (logits, weights, indices)) and `layer.mlp.experts` with fused 3D `gate_up_proj` [E, 2I, H] and
    `down_proj` [E, H, I]."""

    family = "base"
    model_types: tuple = ()
    router_kind = "softmax"
    shared_attrs: tuple = ()  # attribute names of shared-expert modules on the MoE block

    # ---- structure -------------------------------------------------------------------------
    def is_moe_block(self, mlp) -> bool:
        return hasattr(mlp, "gate") and hasattr(mlp, "experts") and hasattr(mlp.gate, "weight")

    def blocks(self, model) -> list[MoEBlock]:
        out = []
        for i, layer in enumerate(decoder_layers(model)):
            mlp = getattr(layer, "mlp", None)
            if mlp is not None and self.is_moe_block(mlp):
                shared = [getattr(mlp, a) for a in self.shared_attrs if getattr(mlp, a, None) is not None]
                out.append(MoEBlock(i, mlp, mlp.gate, mlp.experts, shared))
        return out

    def num_experts(self, block: MoEBlock) -> int:
        return block.router.weight.shape[0]

    def top_k(self, block: MoEBlock) -> int:
        return int(block.router.top_k)

    def shared_expert_count(self, model) -> int:
        return 0

    def expert_param_tensors(self, block: MoEBlock):
        """(name suffix, part, expert, tensor) of the routed-expert weights; each tensor's last dim is
        the input. Fused layouts: one [E, out, in] tensor per part, expert None."""
        ex = block.experts
        if getattr(ex, "is_transposed", False):
            raise UserError(f"{self.family}: transposed expert layouts are not supported")
        return [(n, n, None, p) for n, p in ex.named_parameters() if p.dim() == 3]

    def expert_tensors(self, block: MoEBlock, e: int) -> list[tuple[str, torch.Tensor]]:
        """(part, view) of expert e's weights (writable in place): one physical array per tensor."""
        return [(part, p.data[e]) for _, part, _, p in self.expert_param_tensors(block)]

    # ---- routing ---------------------------------------------------------------------------
    def router_logits(self, router, args, output) -> torch.Tensor:
        """Router logits [tokens, E] from the router's forward hook arguments."""
        return output[0]

    def pack_output(self, router, output, logits, weights, indices):
        """Build the router's output tuple from rewritten logits, weights and indices."""
        return (logits, weights, indices)

    def route(self, router, logits):
        """Family routing from logits: (weights [T, k], indices [T, k]). Must match the module."""
        raise NotImplementedError


class SoftmaxTopKAdapter(Adapter):
    """OLMoE, Qwen2-MoE, Qwen3-MoE: softmax over all experts, top-k, optional renormalisation."""

    def route(self, router, logits):
        probs = F.softmax(logits, dtype=torch.float, dim=-1)
        top, idx = torch.topk(probs, router.top_k, dim=-1)
        if router.norm_topk_prob:
            top /= top.sum(dim=-1, keepdim=True)
        return top.to(logits.dtype), idx


class OlmoeAdapter(SoftmaxTopKAdapter):
    family, model_types = "olmoe", ("olmoe",)


class Qwen2MoeAdapter(SoftmaxTopKAdapter):
    family, model_types = "qwen2_moe", ("qwen2_moe",)
    shared_attrs = ("shared_expert", "shared_expert_gate")

    def shared_expert_count(self, model):
        return 1 if getattr(model.config, "shared_expert_intermediate_size", 0) else 0


class Qwen3MoeAdapter(SoftmaxTopKAdapter):
    family, model_types = "qwen3_moe", ("qwen3_moe",)


class MixtralAdapter(Adapter):
    family, model_types = "mixtral", ("mixtral",)

    def route(self, router, logits):
        probs = F.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, router.top_k, dim=-1)
        top /= top.sum(dim=-1, keepdim=True)
        return top, idx


class DeepseekV2Adapter(Adapter):
    """Softmax scores, greedy or group-limited greedy top-k, times routed_scaling_factor."""

    family, model_types = "deepseek_v2", ("deepseek_v2",)
    shared_attrs = ("shared_experts",)

    def shared_expert_count(self, model):
        return int(getattr(model.config, "n_shared_experts", 0) or 0)

    def route(self, router, logits):
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if router.topk_method == "group_limited_greedy":
            E, G = router.num_experts, router.num_group
            group_scores = scores.view(-1, G, E // G).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
        elif router.topk_method != "greedy":
            raise UserError(f"deepseek_v2: unsupported topk_method {router.topk_method!r}")
        w, idx = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        return w * router.routed_scaling_factor, idx


class DeepseekV3Adapter(Adapter):
    """Sigmoid scores; e_score_correction_bias and group-limited top-k choose the experts, the
    unbiased scores weight them (optionally renormalised), times routed_scaling_factor."""

    family, model_types = "deepseek_v3", ("deepseek_v3",)
    router_kind = "sigmoid"
    shared_attrs = ("shared_experts",)

    def shared_expert_count(self, model):
        return int(getattr(model.config, "n_shared_experts", 0) or 0)

    def route(self, router, logits):
        E, G = router.num_experts, router.num_group
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        # A -inf logit (a replica slot excluded from top-k, romer.methods.replacement) must stay out of the
        # choice although sigmoid(-inf) + bias is finite.
        choice = choice.masked_fill(torch.isneginf(logits), float("-inf"))
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        idx = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if router.norm_topk_prob:
            w /= w.sum(dim=-1, keepdim=True) + 1e-20
        return w * router.routed_scaling_factor, idx


class DeepseekMoeRemoteAdapter(Adapter):
    """DeepSeek-MoE-16B remote code (model_type "deepseek"): `mlp.gate` is a MoEGate whose forward
    returns (topk_idx, topk_weight, aux_loss); experts are a ModuleList of gate/up/down Linear MLPs;
    `mlp.shared_experts` is one dense MLP holding all shared experts."""

    family, model_types = "deepseek_moe", ("deepseek",)
    shared_attrs = ("shared_experts",)

    def is_moe_block(self, mlp):
        return hasattr(mlp, "gate") and isinstance(getattr(mlp, "experts", None), nn.ModuleList)

    def shared_expert_count(self, model):
        return int(getattr(model.config, "n_shared_experts", 0) or 0)

    def expert_param_tensors(self, block):
        return [(f"experts.{e}.{part}", part, e, w) for e, mlp in enumerate(block.experts)
                for part, w in _linear_weights(mlp)]

    def expert_tensors(self, block, e):
        return [(part, w.data) for part, w in _linear_weights(block.experts[e])]

    def router_logits(self, router, args, output):
        h = args[0]
        return F.linear(h.reshape(-1, h.shape[-1]), router.weight, None)

    def pack_output(self, router, output, logits, weights, indices):
        return (indices, weights, *output[2:])

    def route(self, router, logits):
        if getattr(router, "scoring_func", "softmax") != "softmax":
            raise UserError(f"deepseek_moe: unsupported scoring_func {router.scoring_func!r}")
        scores = logits.softmax(dim=-1)
        w, idx = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        if router.top_k > 1 and router.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w, idx


ADAPTERS = [
    OlmoeAdapter(),
    Qwen2MoeAdapter(),
    Qwen3MoeAdapter(),
    MixtralAdapter(),
    DeepseekV2Adapter(),
    DeepseekV3Adapter(),
    DeepseekMoeRemoteAdapter(),
]
SUPPORTED = {a.family: a.model_types for a in ADAPTERS}


def get_adapter(model) -> Adapter:
    """The adapter for this model's family; a clear error for unknown families or dense models."""
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    supported = ", ".join(f"{f} (model_type {'/'.join(t)})" for f, t in SUPPORTED.items())
    for a in ADAPTERS:
        if mtype in a.model_types:
            if not a.blocks(model):
                raise UserError(
                    f"model of type {mtype!r} has no MoE blocks (a dense model?); "
                    f"ROMER needs a Mixture-of-Experts model. Supported families: {supported}"
                )
            return a
    raise UserError(f"unsupported model family {mtype!r}. Supported families: {supported}")


def analog_tensors(model, adapter: Adapter, kinds) -> list[AnalogTensor]:
    """An AnalogTensor for every weight of the given analog kinds.

    Kinds: routed_experts, shared_experts, router, attention (every Linear of every self_attn),
    dense_mlp (MLPs of non-MoE layers). Embeddings, norms, lm_head and biases stay digital.
    Names (`layers.<i>.<module path>`) are the keys of the per-tensor noise seeds: keep them stable.
    """
    kinds = set(kinds)
    out = []
    blocks = {b.layer: b for b in adapter.blocks(model)}

    def linears(module, prefix, kind, i):
        return [AnalogTensor(n, kind, w, layer=i, part=n.removeprefix(prefix + "."))
                for n, w in _linear_weights(module, prefix)]

    for i, layer in enumerate(decoder_layers(model)):
        pre = f"layers.{i}"
        if "attention" in kinds and hasattr(layer, "self_attn"):
            out += linears(layer.self_attn, f"{pre}.self_attn", "attention", i)
        b = blocks.get(i)
        if b is None:
            if "dense_mlp" in kinds and getattr(layer, "mlp", None) is not None:
                out += linears(layer.mlp, f"{pre}.mlp", "dense_mlp", i)
            continue
        if "router" in kinds:
            out.append(AnalogTensor(f"{pre}.mlp.gate.weight", "router", b.router.weight, layer=i, part="weight"))
        if "routed_experts" in kinds:
            out += [AnalogTensor(f"{pre}.mlp.experts.{n}", "routed_experts", t, layer=i, part=part, expert=e)
                    for n, part, e, t in adapter.expert_param_tensors(b)]
        if "shared_experts" in kinds:
            for j, s in enumerate(b.shared):
                out += linears(s, f"{pre}.mlp.shared{j}", "shared_experts", i)
    return out


def describe(model) -> dict:
    """The `romer inspect --json` object."""
    a = get_adapter(model)
    blocks = a.blocks(model)
    counts = {}
    for k in ("routed_experts", "shared_experts", "attention", "router", "dense_mlp"):
        counts[k] = sum(r.tensor.numel() for r in analog_tensors(model, a, [k]))
    return {
        "family": a.family,
        "model_type": model.config.model_type,
        "moe_layers": [b.layer for b in blocks],
        "num_layers": len(decoder_layers(model)),
        "num_experts": a.num_experts(blocks[0]),
        "top_k": a.top_k(blocks[0]),
        "shared_experts": a.shared_expert_count(model),
        "router": a.router_kind,
        "analog_params": counts,
        "total_params": sum(p.numel() for p in model.parameters()),
    }
