"""Benchmarks and studies, run from the checkout (``python -m benchmarks.<name>``); not installed."""
