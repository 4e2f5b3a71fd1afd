"""DVC stage `replace`: see romer/pipeline.py (run_replace) and dvc.yaml for its inputs and outputs."""

import sys
from pathlib import Path

# Repo root instead of stages/ on the path: stages/profile.py would shadow the stdlib `profile`.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from romer.errors import exit_on_user_error  # noqa: E402
from romer.params import load_params  # noqa: E402
from romer.pipeline import run_replace  # noqa: E402


@exit_on_user_error
def main():
    params = load_params()
    run_replace(params)


if __name__ == "__main__":
    main()
