"""Beyond-the-paper stage `family_eval` (beyond/dvc.yaml, foreach): clean, noisy and ROMER on one family.

    python -m stages.family_eval FAMILY
"""

import sys

from romer.beyond.stages import run_family_eval
from romer.core.errors import UserError, stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params


@stage_entry
def main():
    if len(sys.argv) != 2:
        raise UserError("usage: python -m stages.family_eval FAMILY")
    value = sys.argv[1]
    params = load_params()
    set_determinism(params.numerics.threads)
    run_family_eval(params, value)


if __name__ == "__main__":
    main()
