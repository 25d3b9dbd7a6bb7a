"""Training state files (`last.pt`, `best.pt`, cached teacher logits), as written by `torch.save`."""

from __future__ import annotations

from pathlib import Path

import torch


def load_state(path: Path) -> dict:
    """Tensors and plain containers only, never arbitrary objects (`weights_only=True`)."""
    return torch.load(path, map_location="cpu", weights_only=True)
