"""A small module that mirrors the layout of DeepSeek-MoE-16B's remote code (modeling_deepseek.py):
`model.model.layers[i].mlp` is a DeepseekMoE with `gate` (MoEGate: weight, top_k, norm_topk_prob,
scoring_func; forward returns (topk_idx, topk_weight, aux_loss)), `experts` (ModuleList of
gate/up/down Linear MLPs) and `shared_experts` (one dense MLP); the first layers are dense MLPs.
Only the structure and the inference path matter here; attention is a plain projection stack."""

import torch
import torch.nn.functional as F
from torch import nn


class Cfg:
    model_type = "deepseek"

    def __init__(self, **kw):
        self.hidden_size = 32
        self.intermediate_size = 64
        self.moe_intermediate_size = 16
        self.n_routed_experts = 8
        self.num_experts_per_tok = 2
        self.n_shared_experts = 2
        self.first_k_dense_replace = 1
        self.num_hidden_layers = 3
        self.norm_topk_prob = False
        self.scoring_func = "softmax"
        self.vocab_size = 50
        self.__dict__.update(kw)


class DeepseekMLP(nn.Module):
    def __init__(self, cfg, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_routed_experts = cfg.n_routed_experts
        self.scoring_func = cfg.scoring_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.randn(cfg.n_routed_experts, cfg.hidden_size) * 0.5)

    def forward(self, hidden_states):
        h = hidden_states.shape[-1]
        logits = F.linear(hidden_states.reshape(-1, h), self.weight, None)
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight, None


class DeepseekMoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.experts = nn.ModuleList(
            [DeepseekMLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)]
        )
        self.gate = MoEGate(cfg)
        self.shared_experts = DeepseekMLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        x = hidden_states.reshape(-1, shape[-1])
        y = torch.zeros_like(x)
        for k in range(topk_idx.shape[1]):
            for e in range(len(self.experts)):
                sel = topk_idx[:, k] == e
                if sel.any():
                    y[sel] += topk_weight[sel, k, None] * self.experts[e](x[sel])
        return y.view(shape) + self.shared_experts(hidden_states)


class Attn(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


class Layer(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        self.self_attn = Attn(cfg)
        self.mlp = DeepseekMoE(cfg) if i >= cfg.first_k_dense_replace else DeepseekMLP(cfg, cfg.intermediate_size)
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x):
        x = x + self.self_attn(self.norm(x))
        return x + self.mlp(self.norm(x))


class Inner(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Layer(cfg, i) for i in range(cfg.num_hidden_layers)])


class DeepseekForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = Inner(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids):
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(x)
