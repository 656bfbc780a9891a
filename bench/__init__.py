"""Benchmark scripts of cromss-ray (issue 8); run each from the repository root as ``python -m bench.<name>``."""
