"""DVC stage `replace`: picks the underactivated experts and the hot experts to copy.

Run from the repo root as `python -m stages.replace`; the work is romer.pipeline.stages.run_replace, and dvc.yaml names its
deps, params and outs.
"""

from romer.core.errors import stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params
from romer.pipeline.stages import run_replace


@stage_entry
def main():
    params = load_params()
    set_determinism(params.numerics.threads)
    run_replace(params)


if __name__ == "__main__":
    main()
