"""Benchmark harness of fused_imbalance: ``python -m benchmarks.bench`` (see README.md)."""
