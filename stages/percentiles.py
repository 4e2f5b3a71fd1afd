"""DVC stage `percentiles`: clean router-logit percentiles and the `expected` calibration maps.

Run from the repo root as `python -m stages.percentiles`; the work is romer.pipeline.stages.run_percentiles, and dvc.yaml names its
deps, params and outs.
"""

from romer.core.errors import stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params
from romer.pipeline.stages import run_percentiles


@stage_entry
def main():
    params = load_params()
    set_determinism(params.numerics.threads)
    run_percentiles(params)


if __name__ == "__main__":
    main()
