"""Hash every intermediate result of the builtin model's first training steps, and of the single ops
they use, under the project's numerical pins: to find, op by op, where two machines part.

    python scripts/numerics_fingerprint.py --json benchmarks/results/fingerprint_<vendor>.json
    python scripts/numerics_fingerprint.py --compare benchmarks/results/fingerprint_GenuineIntel.json

The model is the default `builtin` recipe (its config and init seed from params.yaml), fed random
tokens from a fixed seed (no tokenizer, no corpus), trained `--steps` steps with the recipe's AdamW
and clipping. Entries, in execution order: each module's forward output, each parameter's gradient
and its value after the optimizer step, then the standalone ops (matmuls at the model's shapes,
grouped_mm, attention, softmax and loss, norms, elementwise maths, reductions, AdamW). `--compare`
prints the first entries that differ from another machine's file: the first differing forward
output names the op that dispatches by CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import romer  # noqa: E402,F401  (before torch: the numerical pins)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from romer.core import numerics  # noqa: E402
from romer.core.numerics import cpu_info, modes, set_determinism  # noqa: E402


def digest(t) -> str:
    if isinstance(t, (tuple, list)):
        return hashlib.sha256("".join(digest(x) for x in t).encode()).hexdigest()[:16]
    if not isinstance(t, torch.Tensor):
        return "-"
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def first_tensors(out):
    """The tensors of a module output (a tensor, a tuple, or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [x for x in out if isinstance(x, torch.Tensor)]
    return []


def model_steps(params, steps: int, entries: dict):
    from romer.builtin.train import balance_loss, build_model, make_optimizer
    from romer.core.lm_loss import chunked_lm_loss
    from romer.moe.adapters import get_adapter

    cfg = params.builtin
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, cfg.vocab_size)
    model.train()
    adapter = get_adapter(model)
    routers = [b.router for b in adapter.blocks(model)]
    opt = make_optimizer(model, cfg)
    for name, p in model.named_parameters():
        entries[f"init.{name}"] = digest(p)
    step_now = [0]
    calls = {}

    def hook(module, args, out, name=None):
        key = f"step{step_now[0]}.fwd.{name}"
        calls[key] = calls.get(key, 0) + 1
        entries[f"{key}#{calls[key]}"] = digest(first_tensors(out))

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in model.named_modules() if n]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    try:
        for step in range(steps):
            step_now[0] = step
            batch = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=gen)
            x, y = batch[:, :-1], batch[:, 1:]
            out = model.model(input_ids=x, output_router_logits=True, use_cache=False)
            ce = chunked_lm_loss(model.lm_head, out.last_hidden_state, y)
            bal, z, _ = balance_loss(out.router_logits, cfg.top_k, routers, adapter)
            loss = ce + cfg.aux_loss_coef * bal + cfg.z_loss_coef * z
            entries[f"step{step}.loss"] = digest(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for name, p in model.named_parameters():
                entries[f"step{step}.grad.{name}"] = digest(p.grad)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            entries[f"step{step}.grad_norm"] = digest(gnorm)
            opt.step()
            for name, p in model.named_parameters():
                entries[f"step{step}.param.{name}"] = digest(p)
    finally:
        for h in handles:
            h.remove()


def single_ops(params, entries: dict):
    """Each op on fixed random inputs at the builtin model's shapes, forward and backward."""
    cfg = params.builtin
    T, H, E, inter, V = cfg.batch_size * cfg.seq_len, cfg.hidden_size, cfg.num_experts, cfg.intermediate_size, \
        cfg.vocab_size
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=False):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    def record(name, fn, *inputs):
        out = fn(*inputs)
        entries[f"op.{name}.fwd"] = digest(out)
        grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        if grads:
            got = torch.autograd.grad(out, grads, torch.ones_like(out) if out.dim() else None)
            entries[f"op.{name}.bwd"] = digest(list(got))

    for n_out in (H, 3 * H, 2 * inter * E // 8, V):  # attention / qkv / an expert slab / the LM head
        record(f"linear_{T}x{H}->{n_out}", F.linear, rnd(T, H, grad=True), rnd(n_out, H, grad=True))
    record(f"mm_{H}x{T}x{H}", torch.mm, rnd(H, T, grad=True), rnd(T, H, grad=True))
    counts = torch.bincount(torch.randint(0, E, (T * cfg.top_k,), generator=g), minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    record("grouped_mm_up", lambda a, b: torch._grouped_mm(a, b.transpose(-2, -1), offs=offs),
           rnd(T * cfg.top_k, H, grad=True), rnd(E, 2 * inter, H, grad=True))
    record("grouped_mm_down", lambda a, b: torch._grouped_mm(a, b.transpose(-2, -1), offs=offs),
           rnd(T * cfg.top_k, inter, grad=True), rnd(E, H, inter, grad=True))
    B, nh, S = cfg.batch_size, cfg.num_heads, cfg.seq_len
    q, k, v = (rnd(B, nh, S, H // nh, grad=True) for _ in range(3))
    record("sdpa_causal", lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v)
    record("bmm_attn", lambda a, b: torch.matmul(a, b.transpose(-2, -1)), q, k)
    logits, target = rnd(T, V, grad=True), torch.randint(0, V, (T,), generator=g)
    record("cross_entropy", lambda a: F.cross_entropy(a, target), logits)
    record("log_softmax", lambda a: F.log_softmax(a, dim=-1), logits)
    record("softmax_router", lambda a: F.softmax(a, dim=-1, dtype=torch.float), rnd(T, E, grad=True))
    record("topk_router", lambda a: torch.topk(a, cfg.top_k, dim=-1).values, rnd(T, E, grad=True))
    record("logsumexp", lambda a: torch.logsumexp(a, dim=-1), rnd(T, E, grad=True))
    x = rnd(T, H, grad=True)
    record("rmsnorm", lambda a: a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6), x)
    record("layer_norm", lambda a: F.layer_norm(a, (H,)), x)
    for fn in ("exp", "log", "sigmoid", "tanh", "sin", "cos", "rsqrt", "sqrt", "erf", "reciprocal"):
        arg = rnd(T, H).abs().add_(0.1).requires_grad_(True)
        record(fn, getattr(torch, fn), arg)
    record("silu", F.silu, rnd(T, H, grad=True))
    record("gelu", F.gelu, rnd(T, H, grad=True))
    record("pow_float", lambda a: a.abs().pow(1.7), rnd(T, H, grad=True))
    record("sum_all", torch.sum, rnd(T, V, grad=True))
    record("mean_dim", lambda a: a.mean(0), rnd(T, V, grad=True))
    record("norm", torch.linalg.vector_norm, rnd(T, V, grad=True))
    record("cumsum", lambda a: torch.cumsum(a, 0), rnd(T, H, grad=True))
    emb = rnd(V, H, grad=True)
    idx = torch.randint(0, V, (T,), generator=g)
    record("embedding", lambda w: F.embedding(idx, w), emb)
    for fused in (None, True):
        p = [rnd(V, H, grad=False).requires_grad_(True), rnd(H, grad=False).requires_grad_(True)]
        opt = torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                **({} if fused is None else {"fused": fused}))
        for _ in range(3):
            for t in p:
                t.grad = torch.randn(t.shape, generator=g)
            opt.step()
        entries[f"op.adamw{'_fused' if fused else ''}"] = digest(p)
    x = rnd(T, H).abs_()
    entries["op.numerics_sqrt.fwd"] = digest(numerics.sqrt(x))
    entries["op.pow_scalar_base.fwd"] = digest(torch.pow(0.5, x.mul(0.05)))  # the drift law's (t0/t)^nu
    analog_ops(params, g, entries)


def analog_ops(params, g, entries: dict):
    """One noise pass and one periphery forward at the pipeline's CIM settings (tile, range crest,
    periphery preset), for the PCM law and for its curves as tables (the form of a fitted model)."""
    from romer.cim.mapping import AnalogWeights
    from romer.cim.noise_models import NoiseModel, pcm_joshi2020
    from romer.cim.periphery import Periphery, periphery_config
    from romer.core.records import AnalogTensor

    cim, noise = params.cim, params.noise
    cfg = periphery_config(cim.periphery.preset)

    def program(name, tensor, kind, part, nm):  # as the pipeline maps it (null weight_scaling: the preset's)
        aw = AnalogWeights([AnalogTensor(name, kind, tensor, layer=0, part=part)], nm,
                           tile=(64, 64) if cim.tile else None, weight_scaling=cim.weight_scaling or cfg.weight_scaling,
                           range_crest=cim.range_crest)
        aw.apply(7, t_inference_s=noise.t_inference_s, drift_compensation=noise.drift_compensation)
        return aw

    w = torch.randn(4, 96, 160, generator=g)
    tables = {**pcm_joshi2020().to_json(), "preset": None, "programming_sigma_poly": None}  # as a fitted model
    for name, nm in (("pcm", pcm_joshi2020()), ("table", NoiseModel.from_json(tables))):
        entries[f"op.noise_pass_{name}.fwd"] = digest(
            program("w", w.clone(), "routed_experts", "gate_up_proj", nm).records[0].tensor)
    lin = torch.nn.Linear(160, 96, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w[0])
    aw = program("lin", lin.weight, "attention", "q_proj", pcm_joshi2020())
    per = Periphery(aw, cfg).install(lin)
    per.reseed(7)
    per.enabled = True
    try:
        with torch.no_grad():
            entries[f"op.periphery_{cim.periphery.preset}.fwd"] = digest(lin(torch.randn(512, 160, generator=g)))
    finally:
        per.remove()


def compare(mine: dict, other_path: Path, show: int = 12) -> int:
    other = json.loads(other_path.read_text())
    a, b = mine["entries"], other["entries"]
    differ = [k for k in a if k in b and a[k] != b[k]]
    missing = sorted(set(a) ^ set(b))
    print(f"{len(a)} entries here ({mine['cpu']}), {len(b)} in {other_path} ({other['cpu']}); "
          f"{len(differ)} differ, {len(missing)} only on one side")
    ops = [k for k in differ if k.startswith("op.")]
    print("standalone ops that differ:", ", ".join(ops) or "none")
    steps = [k for k in differ if not k.startswith("op.")]
    print(f"first {min(show, len(steps))} differing entries of the training steps, in execution order:")
    for k in steps[:show]:
        print("  ", k)
    return 1 if differ else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the fingerprint here")
    ap.add_argument("--compare", type=Path, help="a fingerprint from another machine to compare with")
    args = ap.parse_args(argv)

    from romer.core.params import load_params

    params = load_params(REPO / "params.yaml")
    set_determinism(params.numerics.threads)
    entries = {}
    model_steps(params, args.steps, entries)
    single_ops(params, entries)
    info = cpu_info()
    res = {"cpu": info["model"], "vendor": info["vendor"], "numerics": modes(),
           "versions": {"torch": torch.__version__}, "steps": args.steps, "entries": entries}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {len(entries)} entries to {args.json}")
    return compare(res, args.compare) if args.compare else 0


if __name__ == "__main__":
    sys.exit(main())
