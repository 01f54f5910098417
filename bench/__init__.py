"""Benchmarks that print and save their figures beside floors measured in the same run; each
runs from the repository root as `python -m bench.NAME` (see docs/benchmarks.md)."""
