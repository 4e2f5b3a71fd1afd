"""Regenerate the README results table from metrics/eval.json (run after `dvc repro`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from romer.reporting.report import update_readme  # noqa: E402

if __name__ == "__main__":
    update_readme()
    print("README.md results table updated from metrics/eval.json")
