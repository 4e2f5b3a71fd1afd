"""Regenerate the README results table from metrics/eval.json (run after `dvc repro`)."""

from romer.reporting.report import update_readme

if __name__ == "__main__":
    update_readme()
    print("README.md results table updated from metrics/eval.json")
