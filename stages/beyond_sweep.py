"""DVC stage `beyond_sweep`: collects the noise-scale sweep points.

Run from the repo root as `python -m stages.beyond_sweep`; the work is romer.beyond.stages.run_sweep, and dvc.yaml names its
deps, params and outs.
"""

from romer.beyond.stages import run_sweep
from romer.core.errors import stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params


@stage_entry
def main():
    params = load_params()
    set_determinism(params.numerics.threads)
    run_sweep(params)


if __name__ == "__main__":
    main()
