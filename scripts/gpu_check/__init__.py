"""scripts/gpu-check: the CUDA path proven on a CUDA machine in one run (see __main__.py and the README)."""
