"""Benchmark helpers: model shapes, random weights, and result files (JSON + markdown) with provenance."""
