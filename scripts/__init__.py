"""Operator scripts; scripts/gpu_check is the package behind scripts/gpu-check."""
