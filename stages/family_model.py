"""Beyond-the-paper stage (beyond/dvc.yaml, foreach over beyond.families): see romer/beyond_stages.py (run_family_model).

    python stages/family_model.py FAMILY
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "1000")  # before torch loads OpenMP, as stages/fetch_model.py
sys.path[0] = str(Path(__file__).resolve().parents[1])  # repo root, not stages/

from romer.beyond_stages import run_family_model  # noqa: E402
from romer.errors import UserError, exit_on_user_error  # noqa: E402
from romer.experiment import set_determinism  # noqa: E402
from romer.params import load_params  # noqa: E402


@exit_on_user_error
def main():
    if len(sys.argv) != 2:
        raise UserError("usage: python stages/family_model.py FAMILY")
    params = load_params()
    set_determinism(params.builtin.threads)
    run_family_model(params, sys.argv[1])


if __name__ == "__main__":
    main()
