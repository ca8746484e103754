"""Benchmarks: run ``make bench`` or one module, e.g. ``.venv/bin/python -m bench.intake_bench``."""
