"""Beyond-the-paper stage (beyond/dvc.yaml, foreach): ROMER at one noise scale.

    python stages/sweep_point.py SCALE     -> metrics/sweep/scale_<SCALE>.json, one MLflow run
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # repo root, not stages/

from romer.errors import UserError, exit_on_user_error  # noqa: E402
from romer.experiment import set_determinism  # noqa: E402
from romer.params import load_params  # noqa: E402
from romer.beyond_stages import run_sweep_point  # noqa: E402


@exit_on_user_error
def main():
    if len(sys.argv) != 2:
        raise UserError("usage: python stages/sweep_point.py SCALE")
    try:
        scale = float(sys.argv[1])
    except ValueError:
        raise UserError(f"SCALE must be a number, got {sys.argv[1]!r}") from None
    params = load_params()
    set_determinism(params.builtin.threads)
    run_sweep_point(params, scale)


if __name__ == "__main__":
    main()
