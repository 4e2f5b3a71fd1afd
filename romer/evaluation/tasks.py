"""Zero-shot tasks through lm-eval's HFLM on the in-memory clean, noisy and repaired model.

`evaluate_tasks` wraps the live model (weights already put into a state by Experiment.set_state,
routing hooks from Experiment.routing_plan installed with romer.moe.routing.routed) in lm-eval's
`HFLM`; nothing is reloaded or copied between states.

Tasks are named as in `eval.tasks`:
- local tasks (LOCAL_TASKS), built deterministically from the bundled corpus's *test* split and
  registered with lm-eval through a generated YAML config (`dataset_path: json`, local data file),
  so they run offline. `builtin_cloze` (a choice of this project): the context is CTX_LINES
  consecutive non-blank lines of a play; the choices are the true next line and N_CHOICES - 1
  distractor lines drawn from far away in the same split (chance 1/4). Its main metric is
  acc_mutual_info (argmax of log P(line | context) - log P(line)); acc and acc_norm are reported
  too. Measured on a 1.4M-parameter builtin model (test ppl 76), 200 items: acc 0.255 and
  acc_norm 0.27 sit at chance, because plain log-likelihood picks the a-priori likeliest line
  whatever the context, while acc_mutual_info reaches 0.40, so only it can show damage and repair.
- any lm-eval task name (lambada_openai, arc_easy, arc_challenge, piqa, ...). These need their
  datasets from the Hugging Face hub (or its cache), so they only run online.

A name that is neither stops with a UserError that names it and lists the local tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from romer.core.errors import UserError
from romer.evaluation.measure import mean_ci

TASKS_DIR = "artifacts/tasks"
STANDARD_EXAMPLES = ("lambada_openai", "arc_easy", "arc_challenge", "piqa")

# builtin_cloze definition (bump VERSION when the construction changes: it keys the cache).
VERSION = 2
N_ITEMS = 200
CTX_LINES = 4
N_CHOICES = 4
MIN_CHARS = 25  # a "content" line (target or distractor); speaker tags and stage cues are shorter
MIN_DISTANCE = 200  # distractors come from at least this many lines away from the target
SEED = 1234


# ---- the local task -----------------------------------------------------------------------------
def _content(line: str) -> bool:
    s = line.strip()
    return len(s) >= MIN_CHARS and not s.startswith("[")


def build_cloze(text: str, n_items: int = N_ITEMS, ctx_lines: int = CTX_LINES, n_choices: int = N_CHOICES,
                seed: int = SEED) -> list[dict]:
    """Multiple-choice next-line items from `text`, a pure function of its arguments.

    Targets are content lines spread evenly over the text, each preceded by `ctx_lines`
    consecutive non-blank lines (no blank line inside the window, so the context is one speech or
    adjacent speeches). Distractors are distinct content lines at least MIN_DISTANCE lines away.
    """
    lines = [ln.rstrip() for ln in text.split("\n")]
    content = [i for i, ln in enumerate(lines) if _content(ln)]
    candidates = [i for i in content
                  if i >= ctx_lines and all(lines[j].strip() for j in range(i - ctx_lines, i))]
    if len(candidates) < 1 or len(content) < n_choices:
        raise UserError(f"the text is too short to build the builtin_cloze task ({len(lines)} lines, "
                        f"{len(candidates)} usable targets); use more text for the test split")
    n = min(n_items, len(candidates))
    picks = [candidates[round(k * (len(candidates) - 1) / max(n - 1, 1))] for k in range(n)]
    picks = sorted(set(picks))
    items = []
    for k, i in enumerate(picks):
        rng = random.Random(f"{seed}:{k}")
        target = lines[i].strip()
        far = [j for j in content if abs(j - i) >= MIN_DISTANCE] or [j for j in content if j != i]
        distractors, seen = [], {target}
        for j in rng.sample(far, len(far)):
            s = lines[j].strip()
            if s not in seen:
                seen.add(s)
                distractors.append(s)
            if len(distractors) == n_choices - 1:
                break
        if len(distractors) < n_choices - 1:
            continue
        label = rng.randrange(n_choices)
        choices = distractors[:label] + [target] + distractors[label:]
        context = "\n".join(lines[j].strip() for j in range(i - ctx_lines, i))
        items.append({"id": k, "line": i, "context": context, "choices": choices, "label": label})
    return items


def _cloze_yaml(name: str, data_file: Path) -> str:
    # target_delimiter "\n": each choice is scored as the next line of the context.
    cfg = {
        "task": name,
        "dataset_path": "json",
        # cache_dir: datasets' Arrow cache of the file stays next to it, whatever HF_HOME is.
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())},
                           "cache_dir": str((data_file.parent / "hf_cache").resolve())},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "\n",
        # acc_mutual_info adds one unconditional request per choice (short: the choice alone).
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("acc", "acc_norm", "acc_mutual_info")],
        "metadata": {"version": VERSION},
    }
    return json.dumps(cfg, indent=2) + "\n"  # JSON is valid YAML


# name -> (item builder, YAML writer, main metric)
LOCAL_TASKS = {"builtin_cloze": (build_cloze, _cloze_yaml, "acc_mutual_info")}


def write_local_task(name: str, text: str, root=TASKS_DIR) -> Path:
    """Build local task `name` from `text` into `root/<name>-<hash>/` (once; reused while the text
    and the definition are unchanged) and return that directory (an lm-eval include path)."""
    build, yaml_of, _ = LOCAL_TASKS[name]
    key = hashlib.sha256(f"{name}|v{VERSION}|{N_ITEMS}|{CTX_LINES}|{N_CHOICES}|{SEED}|".encode()
                         + text.encode()).hexdigest()[:12]
    out = Path(root) / f"{name}-{key}"
    if (out / f"{name}.yaml").is_file():
        return out
    items = build(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        data = tmp / f"{name}.jsonl"
        data.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
        (tmp / f"{name}.yaml").write_text(yaml_of(name, out / data.name))
        try:
            os.rename(tmp, out)
        except OSError:  # another process built it first (same content)
            if not (out / f"{name}.yaml").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- task resolution ----------------------------------------------------------------------------
def _unknown(name: str) -> UserError:
    return UserError(
        f"params key 'eval.tasks': unknown lm-eval task '{name}'. Local tasks (offline): "
        f"{', '.join(sorted(LOCAL_TASKS))}. Standard lm-eval tasks such as {', '.join(STANDARD_EXAMPLES)} "
        f"can be named too, but need the Hugging Face hub for their datasets.")


def check_task_names(names):
    """Fail fast (before any model work) on a name that is neither local nor an lm-eval task."""
    standard = [n for n in dict.fromkeys(names) if n not in LOCAL_TASKS]
    if not standard:
        return
    from lm_eval.tasks import TaskManager

    with _quiet():
        known = set(TaskManager().all_tasks)
    for n in standard:
        if n not in known:
            raise _unknown(n)


def load_tasks(names, builtin_cfg, root=TASKS_DIR) -> dict:
    """lm-eval task dict ({"tasks": {name: Task}, ...}) for the names; UserError on a bad name."""
    from lm_eval.tasks import TaskManager

    names = list(dict.fromkeys(names))
    local = [n for n in names if n in LOCAL_TASKS]
    include = []
    if local:
        from romer.data.corpus import builtin_splits

        text = builtin_splits(builtin_cfg)["test"]
        include = [str(write_local_task(n, text, root)) for n in local]
    standard = [n for n in names if n not in LOCAL_TASKS]
    with _quiet():
        tm = TaskManager(include_path=include or None, include_defaults=bool(standard))
    for n in standard:
        if n not in tm.all_tasks:
            raise _unknown(n)
    try:
        with _quiet():
            import datasets

            datasets.disable_progress_bars()
            return tm.load(names)
    except Exception as e:
        bad = ", ".join(standard) or ", ".join(names)
        raise UserError(
            f"params key 'eval.tasks': cannot load lm-eval task(s) {bad} ({type(e).__name__}: {str(e)[:300]}). "
            f"Standard tasks fetch their datasets from the Hugging Face hub, which is unreachable here; "
            f"the local tasks ({', '.join(sorted(LOCAL_TASKS))}) run offline.") from None


@contextmanager
def _quiet(level=logging.WARNING):
    """lm-eval logs every request batch at INFO; keep the stage log to our progress lines."""
    log = logging.getLogger("lm_eval")
    old = log.level
    log.setLevel(max(level, old) if old else level)
    try:
        yield
    finally:
        log.setLevel(old)


@contextmanager
def _no_router_logits(model):
    """transformers' load_balancing_loss_func crashes in lm-eval generation when this is True."""
    old = getattr(model.config, "output_router_logits", False)
    model.config.output_router_logits = False
    try:
        yield
    finally:
        model.config.output_router_logits = old


def _score(name: str, result: dict) -> tuple[str, float, dict]:
    """(main metric, its value, all numeric metrics) of one task's lm-eval result."""
    vals = {k.split(",")[0]: float(v) for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "," in k and "_stderr" not in k}
    preferred = (LOCAL_TASKS[name][2],) if name in LOCAL_TASKS else ()
    for m in preferred + ("acc", "acc_norm", "exact_match", "word_perplexity"):
        if m in vals:
            return m, vals[m], vals
    if not vals:
        raise RuntimeError(f"lm-eval returned no numeric metric: {sorted(result)}")
    m = sorted(vals)[0]
    return m, vals[m], vals


# ---- evaluation ---------------------------------------------------------------------------------
def _lm_class(HFLM):
    """HFLM, without its per-request progress bars when stderr is not a terminal (DVC stage logs):
    evaluate_tasks prints one line per model state instead."""
    import sys

    if sys.stderr.isatty():
        return HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def run_tasks(lm, task_dict, limit=None) -> dict:
    """{task: (metric, value, all metrics)} for the model state and routing now in place."""
    from lm_eval import evaluator

    with _quiet():
        res = evaluator.evaluate(lm, task_dict, limit=limit, bootstrap_iters=0, log_samples=False)
    return {name: _score(name, res["results"][name]) for name in task_dict["tasks"]}


def evaluate_tasks(exp, tasks, romer_states, limit=None, root=TASKS_DIR, batch_size=None) -> dict:
    """Zero-shot accuracy of the clean model and, per eval seed, of `noisy` and `romer`.

    romer_states: {seed: (plan, maps)}, the replacement plan and percentile maps ROMER used on that
    noise instance in the perplexity evaluation (romer.pipeline.stages.evaluate_seed), reused here so
    the tasks see exactly the same repaired model. Returns {task: {"metric", "n_items", "clean", "noisy", "romer",
    "all": {other metric: {"clean", "noisy", "romer"}}}}; "metric" names the main metric
    (builtin_cloze: acc_mutual_info; lm-eval tasks: acc where they have it), and noisy/romer are
    mean_ci over the eval seeds.
    """
    from lm_eval.models.huggingface import HFLM

    from romer.moe.routing import routed

    p = exp.params
    task_dict = load_tasks(tasks, p.builtin, root)
    names = list(task_dict["tasks"])
    bs = batch_size or max(p.eval.batch_size, 16)
    mode = p.calibrate.mode
    with _quiet(logging.ERROR):
        lm = _lm_class(HFLM)(pretrained=exp.model, tokenizer=exp.tokenizer, batch_size=bs)
    n_items = {n: (len(t.eval_docs) if limit is None else min(limit, len(t.eval_docs)))
               for n, t in task_dict["tasks"].items()}

    def state(label, routing_plan):
        t0 = time.time()
        with _no_router_logits(exp.model), routed(exp.model, exp.adapter, routing_plan):
            got = run_tasks(lm, task_dict, limit)
        desc = ", ".join(f"{n} {m}={v:.3f}" for n, (m, v, _) in got.items())
        print(f"tasks: {label}: {desc} ({sum(n_items.values())} items, {time.time() - t0:.1f} s)", flush=True)
        return got

    runs = {"clean": None, "noisy": [], "romer": []}
    exp.set_state(None)
    runs["clean"] = state("clean", None)
    for seed in p.eval.seeds:
        exp.set_state(seed)
        runs["noisy"].append(state(f"seed {seed} noisy", None))
        plan, maps = romer_states[seed]
        exp.set_state(seed, plan)
        runs["romer"].append(state(f"seed {seed} romer ({mode})", exp.routing_plan(plan, maps)))
    exp.restore()

    out = {}
    for n in names:
        metric = runs["clean"][n][0]
        entry = {"metric": metric, "n_items": n_items[n], "clean": runs["clean"][n][1],
                 "noisy": mean_ci([r[n][1] for r in runs["noisy"]]),
                 "romer": mean_ci([r[n][1] for r in runs["romer"]])}
        others = [m for m in runs["clean"][n][2] if m != metric]
        if others:
            entry["all"] = {m: {"clean": runs["clean"][n][2][m],
                                "noisy": mean_ci([r[n][2][m] for r in runs["noisy"]]),
                                "romer": mean_ci([r[n][2][m] for r in runs["romer"]])} for m in others}
        out[n] = entry
    return out
