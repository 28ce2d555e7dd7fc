"""Benchmarks of lightning_flatness (see RESULTS.md)."""
