"""DVC stage `evaluate`: see romer/pipeline.py (run_evaluate) and dvc.yaml for its inputs and outputs."""

import sys
from pathlib import Path

# Repo root instead of stages/ on the path: stages/profile.py would shadow the stdlib `profile`.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from romer.errors import exit_on_user_error  # noqa: E402
from romer.experiment import set_determinism  # noqa: E402
from romer.params import load_params  # noqa: E402
from romer.pipeline import run_evaluate  # noqa: E402


@exit_on_user_error
def main():
    params = load_params()
    set_determinism(params.builtin.threads)
    run_evaluate(params)


if __name__ == "__main__":
    main()
