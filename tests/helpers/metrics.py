"""Readings of the inspector's one metrics object that several test modules check."""

from __future__ import annotations

from inspector.metrics import Metrics


def model_reloads(metrics: Metrics) -> tuple[int, int]:
    """(successful, failed) model reloads the store counted."""
    get = metrics.registry.get_sample_value
    return tuple(int(get("inspector_model_reloads_total", {"result": r})) for r in ("success", "failure"))
