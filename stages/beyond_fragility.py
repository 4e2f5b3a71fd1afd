"""DVC stage `fragility` (beyond/dvc.yaml): what makes each family's routing fragile, per layer.

Run from the repo root as `python -m stages.beyond_fragility`; the work is romer.beyond.stages.run_fragility,
and beyond/dvc.yaml names its deps, params and outs.
"""

from romer.beyond.stages import run_fragility
from romer.core.errors import stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params


@stage_entry
def main():
    params = load_params()
    set_determinism(params.numerics.threads)
    run_fragility(params)


if __name__ == "__main__":
    main()
