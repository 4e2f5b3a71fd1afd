"""Cost of the evaluation path against a plain transformers forward pass, in one process.

Measures on the same model and the same tokens:
  (a) a plain forward loop (no hooks, no noise): tokens/s;
  (b) the project's evaluation path for one method (ROMER: noise applied, replacement routing and
      percentile calibration hooks active, next-token NLL and the routing recorder): tokens/s;
  (c) one noise pass plus one restore of the clean weights: seconds, against the RNG floor (the time
      torch takes to draw the pass's normals, 3 per conductance, 2 conductances per weight, into a
      reused 64 MiB buffer);
  (d) the evaluation path of (b) with the periphery (--periphery, default aihwkit-io-default) on
      every analog matmul: tokens/s and its ratio to the plain forward;
  (e) the memory floor of (d): the evaluation path of (b) with each analog matmul wrapped in the
      least work any periphery around the library's matmuls must do (its inputs read and written
      once, as a DAC would; its outputs read once with their noise and written back in place, as an
      ADC would). No implementation of (d) that calls torch's matmuls can be faster than (e).
(a), (b), (d) and (e) run in turn, one warm-up round then --repeats rounds, so a slow spell of a shared
machine hits all four alike; each ratio is the median over rounds of that round's ratio. (c) is
the median of --repeats after a warm-up. With --json the last line is one JSON object.

  python benchmarks/eval_overhead.py                       # builtin model if trained, else tiny random
  python benchmarks/eval_overhead.py --device cuda --shape olmoe-1b-7b --json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import romer  # noqa: F401  (before torch: pins the CPU numerical modes)
import torch
import torch.nn.functional as F

from romer.moe.adapters import analog_tensors, get_adapter
from romer.methods.calibration import make_transform
from romer.cim.mapping import AnalogWeights, device_chain
from romer.cim.periphery import Periphery, periphery_config
from romer.evaluation.measure import nll_pass
from romer.pipeline.experiment import Experiment
from romer.cim.sources import resolve_noise_model
from romer.core.params import ANALOG_KINDS, load_params
from romer.methods.replacement import make_plan, routing_fns, weight_edit
from romer.moe.routing import Recorder
from romer.methods.calibration import compose

SHAPES = {
    # OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): 16 layers, 64 experts top-8, hidden 2048, expert FFN 1024.
    "olmoe-1b-7b": dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                        max_position_embeddings=4096, norm_topk_prob=False, clip_qkv=None),
    # A CPU-sized model as wide as a small real MoE: where (d) and (e) approach the plain forward.
    "wide": dict(vocab_size=4096, hidden_size=1024, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=8, num_experts=64, num_experts_per_tok=8,
                 max_position_embeddings=512, norm_topk_prob=False, clip_qkv=None),
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                 max_position_embeddings=512),
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device, repeats, warmup=1) -> dict:
    """Per name, the times of `repeats` rounds that each run every function once, in turn: a slow
    spell of a shared machine then hits all of them alike, so ratios are taken per round. A value
    may be (before, fn, after): the untimed set-up and tear-down around fn."""
    fns = {k: v if isinstance(v, tuple) else (None, v, None) for k, v in fns.items()}
    out = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, (before, fn, after) in fns.items():
            if before:
                before()
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            dt = time.perf_counter() - t
            if after:
                after()
            if r >= warmup:
                out[k].append(dt)
    return out


def paired_ratio(times: dict, num: str, den: str) -> float:
    """The median over rounds of times[num] / times[den]."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def timed(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def rng_floor(n: int, gen, device, block: int = 1 << 24):
    """Drawing n normals with torch, into one reused buffer of `block` (64 MiB): the RNG work alone.
    One randn(n) call would also time the allocation of n fresh floats (5 GB on the wide shape, page
    faults included), which the noise pass, working in blocks, does not pay."""
    buf = torch.empty(min(n, block), device=device)

    def draw():
        for i in range(0, n, block):
            torch.randn(min(block, n - i), generator=gen, device=device, out=buf[:min(block, n - i)])
    return draw


class PeripheryFloor(Periphery):
    """(e): each analog matmul with its inputs copied once (x read, x' written) and its outputs read
    once with a noise term and written back in place: the memory traffic of a DAC and an ADC, nothing
    else. Installed, switched and looked up as the periphery is; only the matmuls differ."""

    def __init__(self, weights, numel):
        super().__init__(weights, periphery_config("ideal"))
        self.noise = torch.randn(numel)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear or func is torch._grouped_mm:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if self._lookup(w) is not None:
                u = func(args[0] * 1.0, *args[1:], **kwargs)
                return u.add_(self.noise[:u.numel()].view(u.shape).to(u.device, u.dtype))
        return func(*args, **kwargs)


def build_random(shape, device, dtype, experts_impl="grouped_mm"):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(**SHAPES[shape], experts_implementation=experts_impl)
    torch.manual_seed(0)
    with torch.device(device):
        model = OlmoeForCausalLM(cfg).to(dtype)
    for n, p in model.named_parameters():  # init is slow for 7B on CPU; plain normal is enough
        if n.endswith("mlp.gate.weight"):
            p.data.normal_(0, 1.0 / p.shape[1] ** 0.5)
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default=None, choices=list(SHAPES), help="random model of this shape (default: builtin)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4, help="batches per timed pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--noise", default="data/chip/pcm_sample.csv",
                    help="noise source (default: the pipeline's, a model fitted to the sample chip CSV)")
    ap.add_argument("--periphery", default="aihwkit-io-default", help="periphery preset of (d)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--experts-impl", default="grouped_mm", choices=["grouped_mm", "eager", "batched_mm"])
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also report the N ops that take most CPU time in one batch of (d), each with its time "
                         "in one batch of (b) (torch profiler)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    params = load_params() if Path("params.yaml").exists() else None
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    noise_model = resolve_noise_model(args.noise, 2)
    use_builtin = args.shape is None and Path("models/model/config.json").exists() and params is not None
    if use_builtin:
        params.model.device = args.device
        exp = Experiment(params, noise_model=noise_model)
        model, vocab, label = exp.model, exp.model.config.vocab_size, "builtin"
    else:
        shape = args.shape or "tiny"
        model = build_random(shape, args.device, dtype, args.experts_impl)
        vocab, label = SHAPES[shape]["vocab_size"], shape
    # The eval set one evaluation pass covers: the builtin test split, else WikiText-2 test (~0.29M tokens).
    if use_builtin:
        e = params.eval
        eval_set_tokens = exp.windows(e.dataset, e.seq_len, max_tokens=e.max_tokens).numel()
    else:
        eval_set_tokens = 290_000
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    E = adapter.num_experts(blocks[0])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_tokens = args.batch * args.seq_len * args.batches
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, vocab, (args.batch * args.batches, args.seq_len), generator=g)

    # (a) plain forward loop
    def plain():
        with torch.no_grad():
            for i in range(0, windows.shape[0], args.batch):
                model(windows[i:i + args.batch].to(args.device), use_cache=False)

    # (c) noise pass + restore (the clean copy lives on the CPU, pinned on CUDA)
    t0 = time.perf_counter()
    pcfg = periphery_config(args.periphery)
    cim = params.cim if params is not None else None  # the pipeline's mapping (tile, full-scale crest)
    weights = AnalogWeights(analog_tensors(model, adapter, ANALOG_KINDS), noise_model,
                            tile=(tuple(cim.tile) if cim.tile else None) if cim else (512, 512),
                            weight_scaling=pcfg.weight_scaling, range_crest=cim.range_crest if cim else 12.0)
    t_setup = time.perf_counter() - t0
    plan = make_plan({b.layer: torch.linspace(0.001, 2, E).softmax(0).tolist() for b in blocks}, 0.25, 2, "copy_router")
    edit = weight_edit(plan)
    t_noise = timed(lambda: weights.apply(seed=1, t_inference_s=86400.0, edit=edit), args.device, args.repeats)
    t_restore = timed(weights.restore, args.device, args.repeats)
    n_normals = 6 * sum(r.tensor.numel() for r in weights.records)
    gen = torch.Generator(device=args.device).manual_seed(0)
    t_rng = timed(rng_floor(n_normals, gen, args.device), args.device, args.repeats)

    # (b) evaluation path: ROMER state + hooks + NLL + routing recorder
    weights.apply(seed=1, t_inference_s=86400.0, edit=edit)
    fns = {b.layer: routing_fns([(p["slot"], p["source"]) for p in plan["layers"][str(b.layer)]], "copy_router", E)
           for b in blocks}
    a, b_ = torch.ones(E, dtype=torch.float64) * 1.01, torch.zeros(E, dtype=torch.float64)
    rplan = {b.layer: compose(make_transform(a, b_), *fns[b.layer]) for b in blocks}

    def eval_path():
        nll_pass(model, adapter, windows, args.batch, args.device, rplan, Recorder(indices=True))

    periphery = Periphery(weights, pcfg)
    periphery.reseed(1)
    floor = PeripheryFloor(weights, args.batch * args.seq_len * max(model.config.num_experts_per_tok, 1)
                           * max(model.config.hidden_size, 2 * model.config.intermediate_size))
    floor.reseed(1)

    def through(mode):  # (set up, run, tear down): the mode's hooks are on only while it is timed
        def on():
            mode.install(model)
            mode.enabled = True

        def off():
            mode.enabled = False
            mode.remove()
        return on, eval_path, off

    # (a), (b), (d) and (e) in turn, round after round
    times = interleaved({"plain": plain, "eval": eval_path, "periphery": eval_path if pcfg.ideal else through(periphery),
                         "floor": through(floor)}, args.device, args.repeats)
    t_plain, t_eval, t_eval_p = (statistics.median(times[k]) for k in ("plain", "eval", "periphery"))
    profile_top = profile_totals = None
    if args.profile:  # where (d) spends its time: torch profiler over one batch, ops by self CPU time
        from torch.profiler import profile

        one = windows[:args.batch]

        def ops_of(mode):  # {op: (self CPU ms, calls)} of one batch, after one unprofiled batch
            on, _, off = through(mode) if mode is not None else (None, None, None)
            if on:
                on()
            nll_pass(model, adapter, one, args.batch, args.device, rplan, Recorder(indices=True))
            with profile() as prof:
                nll_pass(model, adapter, one, args.batch, args.device, rplan, Recorder(indices=True))
            if off:
                off()
            return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}

        with_p, without = ops_of(None if pcfg.ideal else periphery), ops_of(None)
        top = sorted(with_p, key=lambda k: -with_p[k][0])[:args.profile]
        # each op's time in (d) and in (b): what the periphery adds, op by op
        profile_top = [{"op": k, "self_cpu_ms": with_p[k][0], "calls": with_p[k][1],
                        "self_cpu_ms_without_periphery": without.get(k, (0.0, 0))[0],
                        "calls_without_periphery": without.get(k, (0.0, 0))[1]} for k in top]
        profile_totals = {"self_cpu_ms": sum(v[0] for v in with_p.values()),
                          "self_cpu_ms_without_periphery": sum(v[0] for v in without.values())}
    weights.restore()

    res = {
        "model": label,
        "device": args.device,
        "dtype": str(dtype).replace("torch.", ""),
        "experts_implementation": model.config._experts_implementation,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "tokens_per_pass": n_tokens,
        "weight_bytes": weight_bytes,
        "analog_params": sum(r.tensor.numel() for r in analog_tensors(model, adapter, ANALOG_KINDS)),
        "forward_tokens_per_s": n_tokens / t_plain,
        "eval_tokens_per_s": n_tokens / t_eval,
        "eval_vs_forward_ratio": paired_ratio(times, "plain", "eval"),
        "noise": args.noise,
        "noise_pass_compiled": bool(noise_model.curves(86400.0, torch.float32, args.device)["exact"])
        and not device_chain.failed,  # exact curves, and torch.compile worked here
        "noise_pass_s": t_noise,
        "rng_floor_s": t_rng,
        "noise_pass_vs_rng_floor": t_noise / t_rng,
        "periphery": pcfg.name,
        "eval_periphery_tokens_per_s": n_tokens / t_eval_p,
        "eval_periphery_vs_forward_ratio": paired_ratio(times, "plain", "periphery"),
        "eval_periphery_floor_vs_forward_ratio": paired_ratio(times, "plain", "floor"),
        "eval_periphery_vs_floor_ratio": paired_ratio(times, "floor", "periphery"),
        "rounds": args.repeats,
        **({"periphery_profile_top": profile_top, "periphery_profile_totals": profile_totals}
           if profile_top is not None else {}),
        "restore_s": t_restore,
        "clean_copy_setup_s": t_setup,
        "eval_set_tokens": eval_set_tokens,
        "eval_set_pass_s": eval_set_tokens * t_eval / n_tokens,
        "noise_pass_vs_eval_ratio": (t_noise + t_restore) / (eval_set_tokens * t_eval / n_tokens),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "weight_mib": weight_bytes / 2**20,
    }
    if args.device == "cuda":
        res["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["gpu"] = torch.cuda.get_device_name()
    for k, v in res.items():
        if not args.json:
            print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
