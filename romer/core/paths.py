"""Where the stages read and write, relative to the repo root (dvc.yaml names the same paths)."""

MODEL_DIR = "models/model"
NOISE_MODEL = "noise/noise_model.json"
PROFILE_JSON = "metrics/profile.json"
PLAN_JSON = "metrics/replacement_plan.json"
PERCENTILES_JSON = "artifacts/percentiles.json"
EVAL_JSON = "metrics/eval.json"
PLOTS = "metrics/plots"
