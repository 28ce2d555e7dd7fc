"""The GPU check's Python stages (run by ``benchmarks/gpu_check.sh``; each importable without CUDA)."""
