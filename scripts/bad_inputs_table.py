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
    return [
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


SNIPPETS = {
    "eval_text": "from romer.core.params import load_params; from romer.data.text import load_text, eval_windows\n"
                 "from romer.core.errors import exit_on_user_error\n"
                 "@exit_on_user_error\ndef main():\n p = load_params()\n"
                 " class T:\n  def __call__(self, s, add_special_tokens=False): return {'input_ids': list(range(len(s.split())))}\n"
                 " import torch; from romer.data.text import tokenize\n"
                 " eval_windows(tokenize(T(), load_text(p.eval.dataset, p.builtin)), p.eval.seq_len)\nmain()\n",
    "task": "from romer.core.params import load_params; from romer.evaluation.tasks import check_task_names\n"
            "from romer.core.errors import exit_on_user_error\n"
            "@exit_on_user_error\ndef main():\n check_task_names(load_params().eval.tasks)\nmain()\n",
}


def main():
    rows = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for what, over, cmd in cases(tmp):
            params_with(tmp, over or {})
            (tmp / "metrics").mkdir(exist_ok=True)
            if cmd[0].startswith("stages/"):
                argv = [PY, "-m", cmd[0].removesuffix(".py").replace("/", ".")]
            elif cmd[0] == "py":
                argv = [PY, "-c", SNIPPETS[cmd[1]]]
            else:
                argv = ROMER + cmd
                if cmd[0] == "mlflow-log":
                    (tmp / "metrics/eval.json").write_text('{"ppl": {"clean": 1.0}}')
            r = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
            err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
            msg = (err[0] if err else (r.stderr.strip().splitlines() or ["(no message)"])[-1])
            msg = msg.replace(str(tmp) + "/", "").replace(str(tmp), ".")
            tb = "yes" if "Traceback" in r.stderr else "no"
            leftover = "o.json written!" if (tmp / "o.json").exists() else ""
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
