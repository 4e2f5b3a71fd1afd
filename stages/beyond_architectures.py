"""Beyond-the-paper stage `architectures` (beyond/dvc.yaml): see romer/beyond_stages.py (run_architectures)."""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # repo root, not stages/

from romer.beyond_stages import run_architectures  # noqa: E402
from romer.errors import exit_on_user_error  # noqa: E402
from romer.experiment import set_determinism  # noqa: E402
from romer.params import load_params  # noqa: E402


@exit_on_user_error
def main():
    params = load_params()
    set_determinism(params.builtin.threads)
    run_architectures(params)


if __name__ == "__main__":
    main()
