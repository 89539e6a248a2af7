"""Benchmarks of lightning-nipq: accuracy at 2 to 4 bits against LSQ and PTQ, and the cost of training.

Run each from the repository root, e.g. ``python -m benchmarks.accuracy``; see docs/benchmarks.md.
"""
