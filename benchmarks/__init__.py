"""Benchmarks for SHE (run as modules: ``python -m benchmarks.<name>``)."""
