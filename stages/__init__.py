"""DVC stage entry points, one module per stage: run from the repo root as `python -m stages.<name>`."""
