"""Image folders for tests: colour and gray images written to disk, and the X-SDD development set when present."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers import REPO_ROOT

XSDD_DEV = REPO_ROOT / "../shared/datasets/xsdd-dev"


def write_image(path: Path, image: np.ndarray) -> Path:
    """(H, W) gray or (H, W, 3) RGB uint8 → an image file in the format of `path`'s suffix (OpenCV writes BGR)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image[..., ::-1] if image.ndim == 3 else image)
    return path


def hue_folder(root: Path, counts: dict[str, int], size: int = 24, seed: int = 0) -> Path:
    """One class per colour ("red", "green", "blue") whose images share one gray level: only colour tells the
    classes apart. Noisy textures, PNG, `counts` images per class."""
    rng = np.random.default_rng(seed)
    channel = {"red": 0, "green": 1, "blue": 2}
    for name, n in counts.items():
        for i in range(n):
            image = rng.integers(60, 100, (size, size, 3), dtype=np.uint8)
            image[..., channel[name]] += 120
            write_image(root / name / f"{i:03d}.png", image)
    return root


def texture_folder(root: Path, classes: tuple[str, ...] = ("a", "b", "c"), per_class: int = 20, size: int = 32,
                   seed: int = 0) -> Path:
    """Gray PNG classes, each its own brightness and texture: class c has mean 60 + 60c, noise 10 + 15c."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        for i in range(per_class):
            image = np.clip(60 + 60 * c + rng.normal(0, 10 + 15 * c, (size, size)), 0, 255).astype(np.uint8)
            write_image(root / name / f"{i}.png", image)
    return root


def xsdd_dev() -> Path:
    """The shared X-SDD development folder; the test skips when it is absent."""
    if not XSDD_DEV.is_dir():
        pytest.skip(f"shared X-SDD development images not found at {XSDD_DEV.resolve()}")
    return XSDD_DEV.resolve()
