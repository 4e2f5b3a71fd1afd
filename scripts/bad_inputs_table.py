"""Run every bad input we know of and write the table of what each gets to docs/bad_inputs.md.

    python scripts/bad_inputs_table.py        (from the repo root, with the project installed)

Each case runs the real command in a scratch directory and records its exit code and the first line
of its error message, so the table in the docs is what the code does today.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
ROMER = [PY, "-m", "romer.cli"]


def params_with(tmp, over):
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, v in over.items():
        *head, last = dotted.split(".")
        d = base
        for k in head:
            d = d.setdefault(k, {})
        d[last] = v
    (tmp / "params.yaml").write_text(yaml.safe_dump(base))


def csv(tmp, name, text):
    p = tmp / name
    p.write_text(text)
    return str(p.name)


GOOD = "g_target_uS,g_measured_uS\n" + "".join(f"{g},{g + 0.1 * ((i % 7) - 3)}\n" for g in (5, 10, 20) for i in range(12))


def cases(tmp):
    from transformers import LlamaConfig, LlamaForCausalLM, OlmoeConfig, OlmoeForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp / "dense")
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2,
                                       mlp_only_layers=[0, 1])).save_pretrained(tmp / "moe_type_no_blocks")
    olmoe = OlmoeForCausalLM(OlmoeConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, num_experts=4,
                                         num_experts_per_tok=2))
    olmoe.save_pretrained(tmp / "corrupt")
    (tmp / "corrupt/model.safetensors").write_bytes(b"garbage")
    olmoe.save_pretrained(tmp / "noweights")
    (tmp / "noweights/model.safetensors").unlink()
    (tmp / "empty.txt").write_text("")
    (tmp / "short.txt").write_text("To be or not to be.")
    lines = GOOD.splitlines()
    r2 = round2(tmp, olmoe)
    return r2 + [
        ("params: misspelt key", {"noise.scael": 2}, ["stages/fit_noise.py"]),
        ("params: out-of-range value", {"calibrate.percentiles": [95, 5]}, ["stages/fit_noise.py"]),
        ("params: wrong type", {"noise.prog_scale": "high"}, ["stages/fit_noise.py"]),
        ("params: unknown analog kind", {"cim.analog": ["experts"]}, ["stages/profile.py"]),
        ("params: empty seed list", {"eval.seeds": []}, ["stages/evaluate.py"]),
        ("params: missing chip CSV", {"noise.source": "data/chip/missing.csv"}, ["stages/fit_noise.py"]),
        ("CSV: missing required column", None,
         ["fit-noise", csv(tmp, "a.csv", "g_target_uS,g_read\n1,1\n"), "-o", "o.json"]),
        ("CSV: non-numeric cell", None,
         ["fit-noise", csv(tmp, "b.csv", "\n".join(lines[:5] + ["10,abc"] + lines[5:]) + "\n"), "-o", "o.json"]),
        ("CSV: negative conductance", None,
         ["fit-noise", csv(tmp, "c.csv", "\n".join(lines[:3] + ["10,-2"] + lines[3:]) + "\n"), "-o", "o.json"]),
        ("CSV: NaN", None, ["fit-noise", csv(tmp, "d.csv", "\n".join(lines[:3] + ["10,nan"] + lines[3:]) + "\n"),
                            "-o", "o.json"]),
        ("CSV: too few devices per level", None,
         ["fit-noise", csv(tmp, "e.csv", "g_target_uS,g_measured_uS\n5,5.1\n5,4.9\n10,10.2\n"), "-o", "o.json"]),
        ("CSV: empty file", None, ["fit-noise", csv(tmp, "f.csv", ""), "-o", "o.json"]),
        ("CSV: file not found", None, ["fit-noise", "nope.csv", "-o", "o.json"]),
        ("model: MoE family but no MoE blocks", None, ["inspect", "moe_type_no_blocks"]),
        ("model: dense / unknown family (Llama)", None, ["inspect", "dense", "--json"]),
        ("model: corrupt weights", None, ["inspect", "corrupt"]),
        ("model: missing weights", None, ["inspect", "noweights"]),
        ("model: hub id offline", None, ["inspect", "allenai/OLMoE-1B-7B-0924"]),
        ("model: path that does not exist", None, ["inspect", "./no/such/dir"]),
        ("eval text: empty file", {"eval.dataset": "empty.txt"}, ["py", "eval_text"]),
        ("eval text: shorter than one window", {"eval.dataset": "short.txt"}, ["py", "eval_text"]),
        ("lm-eval task that does not exist", {"eval.tasks": ["no_such_task"]}, ["py", "task"]),
        ("MLflow URI unreachable", {"mlflow.tracking_uri": "http://127.0.0.1:9"}, ["mlflow-log"]),
    ]


def _levels(gs=(2, 4, 6, 8, 10, 12, 14, 16, 18), n=20, unit=1.0, bad=None):
    rows = [(g, g + 0.1 * ((i % 7) - 3)) for g in gs for i in range(n)]
    if bad is not None:
        rows[bad[0]] = (rows[bad[0]][0], bad[1])
    return "g_target_uS,g_measured_uS\n" + "".join(f"{g * unit:.12g},{x * unit:.12g}\n" for g, x in rows)


def round2(tmp, olmoe):
    """Reliability round 2: silent wrong results, data loss and misleading errors (each its own dir)."""
    import json

    def d(name):
        (tmp / name).mkdir()
        return name

    from romer.builtin.train import train_tokenizer

    tok = train_tokenizer((REPO / "README.md").read_text(), 300)  # works without a trained models/model

    def pipeline_dir(name, noise_source="data/chip/pcm_sample.csv", tokenizer=True, layers=None, max_pos=None):
        """A scratch repo dir with a tiny models/model and the noise model fit_noise made from noise_source."""
        root = tmp / d(name)
        olmoe.save_pretrained(root / "models/model")
        if tokenizer:
            tok.save_pretrained(root / "models/model")
        cfg = json.loads((root / "models/model/config.json").read_text())
        if layers is not None:
            cfg["num_hidden_layers"] = layers
        if max_pos is not None:
            cfg["max_position_embeddings"] = max_pos
        (root / "models/model/config.json").write_text(json.dumps(cfg))
        (root / "medium.txt").write_text(" ".join(f"word{i % 50}" for i in range(300)))  # a few hundred tokens
        (root / "noise").mkdir()
        (root / "noise/noise_model.json").write_text(json.dumps(
            {"g_max_uS": 25.0, "programming_sigma_poly": {"coeffs_uS": [0.5]}, "source": noise_source,
             "made_with": {"noise.source": noise_source, "noise.degree": 2}}))
        return name

    olmoe.save_pretrained(tmp / "models_more_layers")
    cfg = json.loads((tmp / "models_more_layers/config.json").read_text())
    (tmp / "models_more_layers/config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    (tmp / "chipdir").mkdir()
    (tmp / "chipdir/chip.csv").write_text(_levels())
    (tmp / "w.safetensors").write_bytes(b"x")
    (tmp / "a_file").write_text("x")
    stale = tmp / d("stale_pct")
    (stale / "metrics").mkdir()
    (stale / "artifacts").mkdir()
    (stale / "metrics/replacement_plan.json").write_text('{"strategy": "split", "layers": {}, "replaced": 0}')
    (stale / "artifacts/percentiles.json").write_text(json.dumps(
        {"percentiles": [10.0, 90.0], "made_with": {"calibrate.percentiles": [10.0, 90.0]}}))
    (tmp / "dupkey").mkdir()
    return [
        ("fit: every read stuck at one value", None,
         ["fit-noise", csv(tmp, "stuck.csv", "g_target_uS,g_measured_uS\n" + "".join(
             f"{g},5.0\n" for g in (2, 4, 6, 8, 10, 12) for _ in range(12))), "-o", "o.json"]),
        ("fit: one row in the wrong unit (nS)", None, ["fit-noise", csv(tmp, "row_nS.csv", _levels(bad=(30, 4000.0))),
                                                      "-o", "o.json"]),
        ("fit: a CSV in siemens", None, ["fit-noise", csv(tmp, "siemens.csv", _levels(unit=1e-6)), "-o", "o.json"]),
        ("fit: a value of 1e200", None, ["fit-noise", csv(tmp, "huge.csv", _levels(bad=(30, 1e200))), "-o", "o.json"]),
        ("fit: a target of 1e308", None, ["fit-noise", csv(tmp, "t308.csv", _levels() + "1e308,1e308\n"), "-o", "o.json"]),
        ("fit: --degree 8 on 9 levels", None, ["fit-noise", "chipdir/chip.csv", "-o", "o.json", "--degree", "8"]),
        ("fit-noise: -o names the directory holding the input CSV", None,
         ["fit-noise", "chipdir/chip.csv", "-o", "chipdir", "--degree", "1"]),
        ("fit-noise: -o under a regular file", None, ["fit-noise", "chipdir/chip.csv", "-o", "a_file/o.json"]),
        ("params: duplicate key", "noise:\n  degree: 2\n  degree: 3\n", ["stages/fit_noise.py"], "dupkey"),
        ("params: empty file", "", ["stages/fit_noise.py"], "dupkey"),
        ("params: repeated seed", {"eval.seeds": [0, 0]}, ["stages/fit_noise.py"]),
        ("params: infinite float", {"noise.prog_scale": float("inf")}, ["stages/fit_noise.py"]),
        ("model: config claims more layers than the weights hold", None, ["inspect", "models_more_layers"]),
        ("model: stage run before fetch_model (no models/model)", {}, ["stages/profile.py"], d("no_model")),
        ("model: `romer inspect builtin` outside the repo", None, ["inspect", "builtin"], "no_model"),
        ("model: model.source is fetch_model's own output", {"model.source": "models/model"}, ["stages/fetch_model.py"],
         pipeline_dir("self_source")),
        ("model: model.source is a file", {"model.source": "w.safetensors"}, ["stages/fetch_model.py"]),
        ("model: tokenizer files missing", {}, ["stages/profile.py"], pipeline_dir("no_tok", tokenizer=False)),
        ("stale: noise model made from another noise.source", {"noise.source": "reram-wan2022"}, ["stages/profile.py"],
         pipeline_dir("stale_noise")),
        ("stale: percentiles made with other calibrate.percentiles", {}, ["stages/evaluate.py"], "stale_pct"),
        ("calib.seq_len above max_position_embeddings", {"calib.seq_len": 256, "calib.dataset": "medium.txt"},
         ["stages/profile.py"], pipeline_dir("long_seq", max_pos=128)),
        ("calibration windows would overlap (short text)", {"calib.dataset": "medium.txt", "calib.seq_len": 64},
         ["stages/profile.py"], pipeline_dir("overlap")),
        ("eval.max_tokens below eval.seq_len", {"eval.max_tokens": 100, "eval.dataset": "short.txt"}, ["py", "eval_text"]),
        ("eval text: a directory", {"eval.dataset": "chipdir"}, ["py", "eval_text"]),
        ("MLflow URI: garbage", {"mlflow.tracking_uri": "foo://bar"}, ["mlflow-log"]),
        ("MLflow URI: a plain word (the old file store)", {"mlflow.tracking_uri": "mlruns"}, ["stages/evaluate.py"]),
        ("mlflow-log: --eval-json that is not JSON", None,
         ["mlflow-log", "--eval-json", csv(tmp, "notjson.json", "{oops"), "--tracking-uri", "sqlite:///x.db"]),
        ("fit: a CSV in nanosiemens", None, ["fit-noise", csv(tmp, "nanos.csv", _levels(unit=1e3)), "-o", "o.json"]),
        ("params: NaN inside a list", {"eval.hetero_fractions": [0.25, float("nan")]}, ["stages/fit_noise.py"]),
        ("MLflow URI: sqlite file that is a directory", {"mlflow.tracking_uri": "sqlite:///chipdir"}, ["mlflow-log"]),
    ]


SNIPPETS = {
    "eval_text": "from romer.core.params import load_params; from romer.data.text import load_text, eval_windows\n"
                 "from romer.core.errors import exit_on_user_error\n"
                 "@exit_on_user_error\ndef main():\n p = load_params()\n"
                 " class T:\n  def __call__(self, s, add_special_tokens=False): return {'input_ids': list(range(len(s.split())))}\n"
                 " import torch; from romer.data.text import tokenize\n"
                 " eval_windows(tokenize(T(), load_text(p.eval.dataset, p.builtin)), p.eval.seq_len, p.eval.max_tokens)\nmain()\n",
    "task": "from romer.core.params import load_params; from romer.evaluation.tasks import check_task_names\n"
            "from romer.core.errors import exit_on_user_error\n"
            "@exit_on_user_error\ndef main():\n check_task_names(load_params().eval.tasks)\nmain()\n",
}


def main():
    rows = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for what, over, cmd, *where in cases(tmp):
            cwd = tmp / (where[0] if where else ".")
            if isinstance(over, str):  # the params.yaml text itself
                (cwd / "params.yaml").write_text(over)
            else:
                params_with(cwd, over or {})
            (cwd / "metrics").mkdir(exist_ok=True)
            (cwd / "short.txt").write_text("To be or not to be.")
            if cmd[0].startswith("stages/"):
                argv = [PY, "-m", cmd[0].removesuffix(".py").replace("/", ".")]
            elif cmd[0] == "py":
                argv = [PY, "-c", SNIPPETS[cmd[1]]]
            else:
                argv = ROMER + cmd
                if cmd[0] == "mlflow-log":
                    (cwd / "metrics/eval.json").write_text('{"ppl": {"clean": 1.0}}')
            r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
            err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
            msg = (err[0] if err else (r.stderr.strip().splitlines() or ["(no message)"])[-1])
            msg = msg.replace(str(tmp) + "/", "").replace(str(tmp), ".")
            tb = "yes" if "Traceback" in r.stderr else "no"
            leftover = "o.json written!" if (tmp / "o.json").exists() else ""
            if not (tmp / "chipdir/chip.csv").is_file():
                leftover += " input CSV deleted!"
            rows.append((what, " ".join(cmd if cmd[0] != "py" else ["(library)", cmd[1]]), r.returncode, tb,
                         msg[:300].replace("|", "\\|"), leftover))
            print(f"{what}: rc={r.returncode} {msg[:120]}")
    md = ["# Bad inputs and what they get", "",
          "Generated by `python scripts/bad_inputs_table.py` (each row runs the real command in a scratch dir).",
          "Every case exits non-zero with one line naming the file, row, key or id, no traceback, and writes no output.",
          "", "| bad input | command | exit | traceback | message |", "|---|---|---|---|---|"]
    for what, cmd, rc, tb, msg, left in rows:
        md.append(f"| {what} | `{cmd}` | {rc} | {tb} | {msg} {left} |")
    (REPO / "docs/bad_inputs.md").write_text("\n".join(md) + "\n")
    bad = [r for r in rows if r[2] == 0 or r[3] == "yes" or r[5]]
    if bad:
        print("NOT CLEAN:", bad)
        sys.exit(1)


if __name__ == "__main__":
    main()
