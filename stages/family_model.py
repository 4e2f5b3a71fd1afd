"""Beyond-the-paper stage `family_model` (beyond/dvc.yaml, foreach): trains one family of beyond.families with the builtin recipe.

    python -m stages.family_model FAMILY
"""

import sys

from romer.beyond.stages import run_family_model
from romer.core.errors import UserError, exit_on_user_error
from romer.core.numerics import set_determinism
from romer.core.params import load_params


@exit_on_user_error
def main():
    if len(sys.argv) != 2:
        raise UserError("usage: python -m stages.family_model FAMILY")
    value = sys.argv[1]
    params = load_params()
    set_determinism(params.numerics.threads)
    run_family_model(params, value)


if __name__ == "__main__":
    main()
