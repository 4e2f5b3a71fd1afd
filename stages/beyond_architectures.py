"""DVC stage `beyond_architectures`: collects the families into metrics/architectures.json.

Run from the repo root as `python -m stages.beyond_architectures`; the work is romer.beyond.stages.run_architectures, and dvc.yaml names its
deps, params and outs.
"""

from romer.beyond.stages import run_architectures
from romer.core.errors import stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params


@stage_entry
def main():
    params = load_params()
    set_determinism(params.numerics.threads)
    run_architectures(params)


if __name__ == "__main__":
    main()
