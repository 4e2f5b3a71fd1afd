"""Beyond-the-paper stage `sweep_point` (beyond/dvc.yaml, foreach): ROMER at one noise scale -> metrics/sweep/scale_<SCALE>.json, one MLflow run.

    python -m stages.sweep_point SCALE
"""

import sys

from romer.beyond.stages import run_sweep_point
from romer.core.errors import UserError, stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params


@stage_entry
def main():
    if len(sys.argv) != 2:
        raise UserError("usage: python -m stages.sweep_point SCALE")
    try:
        value = float(sys.argv[1])
    except ValueError:
        raise UserError(f"SCALE must be a number, got {sys.argv[1]!r}") from None
    params = load_params()
    set_determinism(params.numerics.threads)
    run_sweep_point(params, value)


if __name__ == "__main__":
    main()
