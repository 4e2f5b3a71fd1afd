"""DVC stage `profile`: routes calibration tokens through the clean model and the noisy instances (calib.seeds).

Run from the repo root as `python -m stages.profile`; the work is romer.pipeline.stages.run_profile, and dvc.yaml names its
deps, params and outs.
"""

from romer.core.errors import stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params
from romer.pipeline.stages import run_profile


@stage_entry
def main():
    params = load_params()
    set_determinism(params.numerics.threads)
    run_profile(params)


if __name__ == "__main__":
    main()
