"""Tiny random models of every supported MoE family (no download), shared by the tests."""

import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

COMMON = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)

# name -> (builder, expected inspect fields)
FAMILIES = {
    "olmoe": (lambda: OlmoeForCausalLM(OlmoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=16,
                                                    num_experts=8, num_experts_per_tok=2)),
              dict(moe_layers=[0, 1], num_experts=8, top_k=2, shared_experts=0, router="softmax")),
    "qwen2_moe": (lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        **COMMON, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
        dict(moe_layers=[0, 2], num_experts=6, top_k=2, shared_experts=1, router="softmax")),
    "qwen3_moe": (lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(
        **COMMON, head_dim=8, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
        num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)),
        dict(moe_layers=[0, 1], num_experts=8, top_k=3, shared_experts=0, router="softmax")),
    "mixtral": (lambda: MixtralForCausalLM(MixtralConfig(**COMMON, num_hidden_layers=2, intermediate_size=16,
                                                          num_local_experts=4, num_experts_per_tok=2)),
                dict(moe_layers=[0, 1], num_experts=4, top_k=2, shared_experts=0, router="softmax")),
    "deepseek_v2": (lambda: DeepseekV2ForCausalLM(DeepseekV2Config(
        **COMMON, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=1.5)),
        dict(moe_layers=[1, 2], num_experts=8, top_k=2, shared_experts=2, router="softmax")),
    "deepseek_v3": (lambda: DeepseekV3ForCausalLM(DeepseekV3Config(
        **COMMON, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True)),
        dict(moe_layers=[1, 2], num_experts=8, top_k=2, shared_experts=1, router="sigmoid")),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    model = FAMILIES[name][0]()
    # Random init gives near-uniform routers; make them decisive so routing tests mean something.
    for n, p in model.named_parameters():
        if n.endswith("mlp.gate.weight"):
            p.data.normal_(0, 2.0 / p.shape[1] ** 0.5)  # logits ~ N(0, 4): decisive, unsaturated
        if n.endswith("e_score_correction_bias"):
            p.data.normal_(0, 0.1)
    for n, b in model.named_buffers():
        if n.endswith("e_score_correction_bias"):
            b.normal_(0, 0.1)
    return model.eval()
