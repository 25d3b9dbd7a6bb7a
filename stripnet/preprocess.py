"""The one preprocessing: gray frames → model input. Training, evaluation, serving and benchmarks call it.

A frame is resized to the manifest's `size` (area when shrinking, bilinear when enlarging), the gray
plane is replicated to `channels`, and each channel becomes (x/255 − mean) / std.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from schemas.checkpoint import InputSpec


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) uint8 gray → (size, size); the same array when it already has that shape."""
    if image.shape == (size, size):
        return image
    interp = cv2.INTER_AREA if min(image.shape) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def normalize(
    pixels: torch.Tensor | np.ndarray, spec: InputSpec, *, dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """(N, S, S) uint8 → (N, spec.channels, S, S) `dtype`, on the pixels' device.

    With one mean and std for every channel the single gray plane is normalized before it is
    replicated, so the arithmetic runs on 1/C of the data (same numbers: same operations per element)."""
    norm = spec.normalization
    x = torch.as_tensor(pixels).to(dtype).div_(255.0).unsqueeze(1)
    if len(set(norm.mean)) == 1 and len(set(norm.std)) == 1:
        x = x.sub_(norm.mean[0]).div_(norm.std[0]).expand(-1, spec.channels, -1, -1)
    else:
        mean = torch.tensor(norm.mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(norm.std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        x = (x.expand(-1, spec.channels, -1, -1) - mean) / std
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def preprocess(images: Sequence[np.ndarray], spec: InputSpec, **options) -> torch.Tensor:
    """Gray frames of any size → the model input: `resize` each, then `normalize` (options go to it)."""
    return normalize(np.stack([resize(image, spec.size) for image in images]), spec, **options)
