"""Measured runs: ``python -m monai_prompt.benchmarks.bundle_runs`` (the bundle READMEs' numbers)."""
