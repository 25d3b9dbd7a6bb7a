"""Tests that need a CUDA device (pytest -m gpu): skipped without one; scripts/gpu-check runs them."""
