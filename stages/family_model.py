"""Beyond-the-paper stage `family_model` (beyond/dvc.yaml, foreach): trains one family of beyond.families with the builtin recipe.

    python -m stages.family_model FAMILY

It calls the training code directly (not romer.beyond), so that the stage depends on the training
code only: a change of the simulator or the methods does not retrain the families.
"""

import sys
from pathlib import Path

from romer.builtin.train import train_builtin, tune_malloc
from romer.core.errors import UserError, stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params

FAMILY_MODELS = Path("models/families")  # romer.beyond.stages.FAMILY_MODELS, beyond/dvc.yaml


@stage_entry
def main():
    if len(sys.argv) != 2:
        raise UserError("usage: python -m stages.family_model FAMILY")
    name = sys.argv[1]
    params = load_params()
    set_determinism(params.numerics.threads)
    cfg = params.family_builtin(name)
    tune_malloc()
    report = train_builtin(cfg, FAMILY_MODELS / name)
    print(f"family {name}: {report['model']}, {report['params']:,} parameters, val/test PPL "
          f"{report['val_ppl']:.2f}/{report['test_ppl']:.2f}, mean load CV {report['summary']['mean_cv']:.3f}")


if __name__ == "__main__":
    main()
