"""Tests of scripts/: the GPU check's paths that run without a GPU."""
