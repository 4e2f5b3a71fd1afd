"""DVC stage `evaluate`: PPL and tasks of every method over eval.seeds, and the MLflow run.

Run from the repo root as `python -m stages.evaluate`; the work is romer.pipeline.stages.run_evaluate, and dvc.yaml names its
deps, params and outs.
"""

from romer.core.errors import stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params
from romer.pipeline.stages import run_evaluate


@stage_entry
def main():
    params = load_params()
    set_determinism(params.numerics.threads)
    run_evaluate(params)


if __name__ == "__main__":
    main()
