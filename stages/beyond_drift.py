"""DVC stage `beyond_drift`: ROMER over deployment time (drift).

Run from the repo root as `python -m stages.beyond_drift`; the work is romer.beyond.stages.run_drift, and dvc.yaml names its
deps, params and outs.
"""

from romer.beyond.stages import run_drift
from romer.core.errors import stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params


@stage_entry
def main():
    params = load_params()
    set_determinism(params.numerics.threads)
    run_drift(params)


if __name__ == "__main__":
    main()
