"""DVC stage `fetch_model`: trains the embedded model, or records a local dir / pinned hub model.

Run from the repo root as `python -m stages.fetch_model`; the work is romer.builtin.fetch.run_fetch_model, and dvc.yaml names its
deps, params and outs.
"""

from romer.builtin.fetch import run_fetch_model
from romer.core.errors import stage_entry
from romer.core.numerics import set_determinism
from romer.core.params import load_params


@stage_entry
def main():
    params = load_params()
    set_determinism(params.numerics.threads)
    run_fetch_model(params)


if __name__ == "__main__":
    main()
