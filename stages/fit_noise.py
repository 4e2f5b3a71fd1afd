"""DVC stage `fit_noise`: resolves noise.source (a preset, or measurement CSVs fitted) into a noise model.

Run from the repo root as `python -m stages.fit_noise`; the work is romer.cim.stage.run_fit_noise, and dvc.yaml names its
deps, params and outs.
"""

from romer.cim.stage import run_fit_noise
from romer.core.errors import stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params


@stage_entry
def main():
    params = load_params()
    set_determinism(params.numerics.threads)
    run_fit_noise(params)


if __name__ == "__main__":
    main()
