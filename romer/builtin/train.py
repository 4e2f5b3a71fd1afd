"""The embedded default model: a small OLMoE-architecture MoE LM trained on the bundled corpus.

`train_builtin` reads top to bottom: corpus splits -> byte-level BPE tokenizer -> the causal LM of
`builtin.family` from a fixed seed -> AdamW with warmup + cosine decay and a per-layer
load-balancing loss -> validation/test perplexity and per-layer routing statistics ->
save_pretrained (safetensors), written atomically. Everything is a function of `BuiltinParams`
(and the thread count, which changes floating-point reduction order; the default uses every CPU
this process may run on).

The default family is OLMoE; Qwen2-MoE (shared expert) and DeepSeek-V3 (sigmoid router with the
correction bias, group-limited top-k, shared expert, latent attention) are trained the same way
for the across-families results (beyond/dvc.yaml). Why these choices, and the measured figures,
are in docs/builtin_model.md.
"""

from __future__ import annotations

import json
import math
import time

import torch

from romer.core.errors import UserError
from romer.core.io import atomic_path
from romer.core.lm_loss import chunked_lm_loss
from romer.data.corpus import builtin_splits
from romer.moe.routing_metrics import expert_load, load_stats, summarize_layers

SPECIAL_TOKEN = "<|endoftext|>"
FAMILY_NAMES = {"olmoe": "OLMoE", "qwen2_moe": "Qwen2-MoE", "deepseek_moe": "DeepSeek-MoE", "deepseek_v3": "DeepSeek-V3"}


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation, no unknown tokens) trained on `text`.

    Returns a transformers PreTrainedTokenizerFast. It adds no BOS/EOS when encoding, so a text
    maps to one contiguous token stream; `<|endoftext|>` (id 0) serves as bos/eos/pad.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # Feed line-aligned pieces of ~64 kB: the merges only depend on word counts, not on batching.
    lines = text.splitlines(keepends=True)
    pieces, buf, n = [], [], 0
    for line in lines:
        buf.append(line)
        n += len(line)
        if n >= 65536:
            pieces.append("".join(buf))
            buf, n = [], 0
    if buf:
        pieces.append("".join(buf))
    tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer, text: str) -> torch.Tensor:
    """The text as one 1-D LongTensor of token ids, tokenised exactly as the later stages do it
    (romer.data.text.tokenize), so the perplexities reported here are the `clean` ones of `evaluate`."""
    from romer.data.text import tokenize

    return tokenize(tokenizer, text)


# ----------------------------------------------------------------------------- model

def _common(cfg, vocab_size: int) -> dict:
    """Config keys every family shares. output_router_logits must stay False for generation
    (transformers crashes otherwise)."""
    return dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads, num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.seq_len, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=0.02, tie_word_embeddings=cfg.tie_embeddings, output_router_logits=False,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, use_cache=True,
        experts_implementation=cfg.experts_implementation,
    )


def build_olmoe_config(cfg, vocab_size: int):
    """OlmoeConfig of the embedded model for BuiltinParams `cfg` and the trained tokenizer's size."""
    from transformers import OlmoeConfig

    return OlmoeConfig(
        **_common(cfg, vocab_size),
        intermediate_size=cfg.intermediate_size,
        num_experts=cfg.num_experts,
        norm_topk_prob=False,  # as OLMoE: the top-k softmax weights are not renormalised
        router_aux_loss_coef=cfg.aux_loss_coef,
    )


def build_qwen2_moe_config(cfg, vocab_size: int):
    """Qwen2-MoE: softmax top-k router, every layer sparse, one sigmoid-gated shared expert of
    shared_experts x intermediate_size, bias on q/k/v as Qwen."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_common(cfg, vocab_size),
        intermediate_size=cfg.intermediate_size,  # dense MLP size; unused, every layer is sparse
        moe_intermediate_size=cfg.intermediate_size,
        shared_expert_intermediate_size=cfg.shared_experts * cfg.intermediate_size,
        num_experts=cfg.num_experts, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=cfg.aux_loss_coef, use_sliding_window=False,
    )


def _mla(cfg) -> dict:
    """Multi-head latent attention of the DeepSeek configs, head dims scaled down, no query compression."""
    head = cfg.hidden_size // cfg.num_heads
    return dict(q_lora_rank=None, kv_lora_rank=head, qk_rope_head_dim=head // 2, qk_nope_head_dim=head // 2,
                v_head_dim=head, attention_bias=False)


def dense_intermediate_size(cfg) -> int:
    """Width of a dense first layer's MLP: the active expert width of an MoE layer (DeepSeek-MoE-16B:
    10944 against (6 + 2) x 1408 = 11264)."""
    return (cfg.top_k + cfg.shared_experts) * cfg.intermediate_size


def build_deepseek_moe_config(cfg, vocab_size: int):
    """DeepSeek-MoE (the paper's DeepSeek-MoE-16B layout) as transformers' DeepseekV2Config: the
    first `first_dense_layers` layers dense, then softmax router with greedy top-k and no
    renormalisation (routed_scaling_factor 1), `shared_experts` shared experts of intermediate_size.
    Attention is DeepseekV2's latent attention (DeepSeek-MoE-16B itself has plain multi-head
    attention; the routing, which is what ROMER is about, is DeepSeek-MoE's)."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        **_common(cfg, vocab_size), **_mla(cfg),
        intermediate_size=dense_intermediate_size(cfg), moe_intermediate_size=cfg.intermediate_size,
        n_shared_experts=cfg.shared_experts, n_routed_experts=cfg.num_experts, routed_scaling_factor=1.0,
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        first_k_dense_replace=cfg.first_dense_layers,
    )


def build_deepseek_v3_config(cfg, vocab_size: int):
    """DeepSeek-V3: sigmoid router with the e_score_correction_bias (aux-loss-free balancing),
    group-limited top-k, normalised top-k weights, shared experts, multi-head latent attention
    (head dims scaled down; no query compression), dense first `first_dense_layers` layers."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        **_common(cfg, vocab_size), **_mla(cfg),
        intermediate_size=dense_intermediate_size(cfg), moe_intermediate_size=cfg.intermediate_size,
        n_shared_experts=cfg.shared_experts, n_routed_experts=cfg.num_experts, routed_scaling_factor=1.0,
        n_group=cfg.n_group, topk_group=cfg.topk_group, first_k_dense_replace=cfg.first_dense_layers,
        norm_topk_prob=True, rope_interleave=True,
    )


def build_model(cfg, vocab_size: int):
    """A freshly initialised causal LM of cfg.family (seed the RNG first)."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM

    builders = {"olmoe": (build_olmoe_config, OlmoeForCausalLM),
                "qwen2_moe": (build_qwen2_moe_config, Qwen2MoeForCausalLM),
                "deepseek_moe": (build_deepseek_moe_config, DeepseekV2ForCausalLM),
                "deepseek_v3": (build_deepseek_v3_config, DeepseekV3ForCausalLM)}
    make_config, cls = builders[cfg.family]
    return cls(make_config(cfg, vocab_size))


def count_params(model, cfg) -> dict:
    """Total parameters, and the parameters active for one token (top-k of the routed experts)."""
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    inactive = (cfg.num_layers - cfg.first_dense_layers) * (cfg.num_experts - cfg.top_k) * per_expert
    embed = model.config.vocab_size * cfg.hidden_size
    return {"total": total, "active": total - inactive, "embedding": embed,
            "non_embedding": total - embed * (1 if cfg.tie_embeddings else 2)}


def balance_loss(router_logits, top_k: int, routers=None, adapter=None):
    """Switch-Transformer load-balancing loss, computed per MoE layer and averaged over layers;
    also the router z-loss and each layer's top-k indices.

    Per layer: E * sum_e f_e * P_e, with f_e the fraction of the top-k selections that went to
    expert e and P_e its mean router probability; 1.0 when perfectly balanced. transformers'
    `load_balancing_loss_func` instead pools the counts and probabilities of all layers before
    multiplying, which lets one layer's imbalance hide behind another's; per layer it is not.
    Softmax routers: P = softmax(logits), top-k of P. Sigmoid routers (an adapter with router_kind
    "sigmoid", DeepSeek-V3): P = the sigmoid scores normalised per token (DeepSeek-V3's
    sequence-wise balance loss), the selection is the router's own (correction bias, groups), and
    there is no z-loss (the scores are not a softmax).
    """
    sigmoid = adapter is not None and adapter.router_kind == "sigmoid"
    losses, z, chosen = [], [], []
    for i, logits in enumerate(router_logits):
        E = logits.shape[-1]
        if sigmoid:
            s = logits.float().sigmoid()
            probs = s / s.sum(-1, keepdim=True)
            with torch.no_grad():
                idx = adapter.route(routers[i], logits.detach().float())[1]
        else:
            probs = logits.float().softmax(-1)
            idx = probs.topk(top_k, dim=-1).indices
            z.append(torch.logsumexp(logits.float(), dim=-1).pow(2).mean())
        f = torch.zeros(E, device=logits.device).scatter_add_(
            0, idx.reshape(-1), torch.ones(idx.numel(), device=logits.device)) / idx.numel()
        losses.append(E * (f * probs.mean(0)).sum())
        chosen.append(idx)
    zero = torch.zeros((), device=router_logits[0].device)
    return torch.stack(losses).mean(), (torch.stack(z).mean() if z else zero), chosen


@torch.no_grad()
def update_correction_bias(routers, chosen, rate: float):
    """DeepSeek-V3's aux-loss-free balancing: after each step, raise the selection bias of the
    experts loaded below the mean and lower it for those above, by `rate`."""
    for router, idx in zip(routers, chosen):
        E = router.e_score_correction_bias.numel()
        load = torch.bincount(idx.reshape(-1), minlength=E).float()
        router.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))


def _windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens ([n, seq_len]); the last partial one is dropped."""
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int, collect_routing: bool = False):
    """Mean next-token NLL over the windows (seq_len-1 predictions each, as HF `labels=input_ids`).

    With collect_routing, also the top-k expert indices per layer ([tokens, k] each), derived from
    the router logits exactly as the family's router does (romer.moe.adapters).
    """
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    if collect_routing:
        from romer.moe.adapters import get_adapter

        adapter = get_adapter(model)
        routers = [b.router for b in adapter.blocks(model)]
        topk = [[] for _ in routers]
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size]
        out = model.model(input_ids=x, output_router_logits=collect_routing, use_cache=False)
        nll += chunked_lm_loss(model.lm_head, out.last_hidden_state[:, :-1], x[:, 1:], reduction="sum").item()
        count += x[:, 1:].numel()
        if collect_routing:
            for layer, rl in enumerate(out.router_logits):
                topk[layer].append(adapter.route(routers[layer], rl.float())[1])
    model.train(was_training)
    mean = nll / max(count, 1)
    if collect_routing:
        return mean, [torch.cat(t) for t in topk]
    return mean


def routing_report(topk_per_layer, num_experts: int, tau: float = 0.25) -> tuple[list, dict]:
    """Per-layer load statistics (romer.moe.routing_metrics) and their summary over layers."""
    per_layer = []
    for layer, idx in enumerate(topk_per_layer):
        load = expert_load(idx, num_experts)
        st = load_stats(load, tau=tau)
        per_layer.append({"layer": layer, **{k: round(v, 6) for k, v in st.items()},
                          "load": [round(x, 6) for x in load.tolist()]})
    summary = {f"mean_{k}": round(v, 6) for k, v in summarize_layers(per_layer).items() if k != "layer"}
    for key in ("cv", "maxvio", "underactivated_frac"):
        summary[f"max_{key}"] = max(d[key] for d in per_layer)
    summary["min_entropy"] = min(d["entropy"] for d in per_layer)
    return per_layer, summary


def make_optimizer(model, cfg):
    """The recipe's AdamW: weight decay on the matrices but the embeddings. The fused kernel, for its
    own vectorised sqrt: the for-each AdamW's goes through MKL VML, whose last bit differs between
    Intel and AMD (romer.core.numerics; scripts/numerics_fingerprint.py)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def _lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_frac at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def tune_malloc() -> bool:
    """Keep freed memory in the process heap instead of returning it to the OS (glibc only).

    By default glibc maps big allocations with fresh mmap()s and trims the heap eagerly, so a
    training step that allocates the same large activations every time page-faults them in
    again each step: measured 15-40k page faults and 8-17% of the time per step of the builtin
    recipe. Raising the mmap threshold to its maximum (32 MiB) and the trim threshold to 1 GiB
    removes that. Process-wide and harmless elsewhere; called by stages/fetch_model.py. Returns
    whether it took effect.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------- training

def train_builtin(cfg, out_dir, progress: bool = True, return_model: bool = False) -> dict:
    """Train the tokenizer and the model for BuiltinParams `cfg`, save both to `out_dir`.

    `out_dir` is written atomically (built in a temp dir next to it, then renamed) and holds
    config.json, model.safetensors, the tokenizer files and builtin_report.json. Returns the
    report: timings, parameter counts, val/test loss and perplexity, per-layer routing
    statistics on the validation tokens and their summary, and the training history.
    With return_model, returns (report, trained model in eval mode) instead.
    """
    from tqdm.auto import tqdm

    from romer.moe.adapters import get_adapter

    t_start = time.perf_counter()
    splits = builtin_splits(cfg)

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(splits["train"], cfg.vocab_size)
    ids = {k: encode(tokenizer, v) for k, v in splits.items()}
    tokenizer_time = time.perf_counter() - t0
    if ids["train"].numel() < cfg.seq_len + 2:
        raise UserError(f"builtin corpus: the train split has only {ids['train'].numel()} tokens, "
                        f"fewer than builtin.seq_len + 2 = {cfg.seq_len + 2}")
    cap = cfg.eval_tokens
    val_w = _windows(ids["validation"][:cap], cfg.seq_len)
    test_w = _windows(ids["test"][:cap], cfg.seq_len)
    for name, w in (("validation", val_w), ("test", test_w)):
        if w.shape[0] == 0:
            raise UserError(f"builtin corpus: the {name} split has fewer than builtin.seq_len = "
                            f"{cfg.seq_len} tokens ({ids[name].numel()}); raise builtin.max_chars")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(tokenizer))
    model.train()
    nparams = count_params(model, cfg)
    adapter = get_adapter(model)
    routers = [b.router for b in adapter.blocks(model)]
    bias_rate = cfg.bias_update_rate if adapter.router_kind == "sigmoid" else 0.0

    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    train_ids = ids["train"]
    span = torch.arange(cfg.seq_len + 1)
    eval_every = cfg.eval_every or cfg.steps
    # the probe is spread over the whole validation split (its start alone is not representative)
    val_probe = val_w[torch.linspace(0, val_w.shape[0] - 1, min(cfg.eval_windows, val_w.shape[0])).long()]

    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="builtin train", disable=not progress, mininterval=2.0)
    for step in bar:
        lr = _lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, train_ids.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = train_ids[starts[:, None] + span]
        x, y = batch[:, :-1], batch[:, 1:]
        out = model.model(input_ids=x, output_router_logits=True, use_cache=False)
        ce = chunked_lm_loss(model.lm_head, out.last_hidden_state, y)
        bal, z, chosen = balance_loss(out.router_logits, cfg.top_k, routers, adapter)
        loss = ce + cfg.aux_loss_coef * bal + cfg.z_loss_coef * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if bias_rate:
            update_correction_bias(routers, chosen, bias_rate)

        rec = {"step": step + 1, "lr": lr, "train_loss": ce.item(), "balance_loss": bal.item(),
               "z_loss": z.item(), "grad_norm": float(gnorm)}
        if (step + 1) % eval_every == 0 or step + 1 == cfg.steps:
            rec["val_loss"] = evaluate(model, val_probe, cfg.batch_size)
            msg = f"step {step + 1}/{cfg.steps}: train loss {ce.item():.3f}, val loss {rec['val_loss']:.3f}"
            if progress:
                tqdm.write(msg)
        history.append(rec)
        bar.set_postfix(loss=f"{ce.item():.3f}", bal=f"{bal.item():.3f}", refresh=False)
    bar.close()
    train_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.eval()
    val_loss, topk = evaluate(model, val_w, cfg.batch_size, collect_routing=True)
    test_loss = evaluate(model, test_w, cfg.batch_size)
    per_layer, summary = routing_report(topk, cfg.num_experts)
    eval_time = time.perf_counter() - t0

    report = {
        "model": f"builtin {FAMILY_NAMES[cfg.family]}-architecture MoE",
        "params": nparams["total"],
        "active_params": nparams["active"],
        "non_embedding_params": nparams["non_embedding"],
        "tokens": {k: int(v.numel()) for k, v in ids.items()},
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "val_loss": round(val_loss, 6),
        "val_ppl": round(math.exp(val_loss), 4),
        "test_loss": round(test_loss, 6),
        "test_ppl": round(math.exp(test_loss), 4),
        "eval": {"seq_len": cfg.seq_len, "val_windows": int(val_w.shape[0]),
                 "test_windows": int(test_w.shape[0]),
                 "note": "non-overlapping windows, seq_len-1 next-token predictions each"},
        "routing_tokens": int(topk[0].shape[0]) if topk else 0,
        "per_layer": per_layer,
        "summary": summary,
        "tokenizer_time_s": round(tokenizer_time, 2),
        "train_time_s": round(train_time, 2),
        "eval_time_s": round(eval_time, 2),
        "config": cfg.model_dump(),
        "history": history,
    }

    model.config.output_router_logits = False
    with atomic_path(out_dir, is_dir=True) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # no wall times in the saved directory: the same params give a byte-identical output
        slim = {k: v for k, v in report.items() if k != "history" and not k.endswith("_time_s")}
        (tmp / "builtin_report.json").write_text(json.dumps(slim, indent=2) + "\n")
    report["total_time_s"] = round(time.perf_counter() - t_start, 2)
    return (report, model) if return_model else report
