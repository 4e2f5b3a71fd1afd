"""Regenerate the README's results and architectures tables from metrics/, and the generated blocks
of docs/testbed.md from the models' training reports and metrics/fragility.json (run after
`make repro` and `make beyond`)."""

from romer.reporting.report import update_readme, update_testbed_doc

if __name__ == "__main__":
    update_readme()
    print("README.md results (and architectures) tables updated from metrics/")
    print(f"docs/testbed.md blocks updated: {', '.join(update_testbed_doc()) or 'none (no inputs yet)'}")
