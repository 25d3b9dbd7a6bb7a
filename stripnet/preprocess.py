"""The one preprocessing: frames → model input. Training, evaluation, serving and benchmarks call it.

A frame is 8-bit gray (H, W) or 8-bit RGB (H, W, 3) in the manifest's `color`. It is resized to the
manifest's `size` (area when shrinking, bilinear when enlarging); a gray plane is replicated to `channels`,
and each channel becomes (x/255 − mean) / std. In tensors, RGB pixels are planes first: (N, 3, S, S).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from schemas.checkpoint import InputSpec


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) gray or (H, W, 3) RGB uint8 → (size, size[, 3]); the same array when it already has that size."""
    if image.shape[:2] == (size, size):
        return image
    interp = cv2.INTER_AREA if min(image.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def to_color(image: np.ndarray, color: str) -> np.ndarray:
    """A frame in the model's colour: RGB → gray by OpenCV's BT.601 luma, gray → RGB by replication.
    (Decoders that can decode straight to the model's colour do, as training does; this catches the rest.)"""
    if image.ndim == 3 and color == "gray":
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if image.ndim == 2 and color == "rgb":
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return image


def planes(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB → (3, H, W); a gray (H, W) image is already one plane."""
    return image.transpose(2, 0, 1) if image.ndim == 3 else image


def normalize(
    pixels: torch.Tensor | np.ndarray, spec: InputSpec, *, dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """(N, S, S) gray or (N, 3, S, S) RGB uint8 → (N, spec.channels, S, S) `dtype`, on the pixels' device.

    Gray pixels for an RGB model are replicated (a gray camera on a colour model); RGB pixels for a gray
    model are refused: turning colour into gray is the decoder's job (`cv2` BT.601 luma, as in training).
    With one mean and std for every channel the single gray plane is normalized before it is
    replicated, so the arithmetic runs on 1/C of the data (same numbers: same operations per element)."""
    norm = spec.normalization
    x = torch.as_tensor(pixels).to(dtype).div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif spec.color == "gray" or x.shape[1] != spec.channels:
        raise ValueError(f"a {spec.color} model with {spec.channels} channels cannot take pixels of shape "
                         f"{tuple(pixels.shape)}")
    if len(set(norm.mean)) == 1 and len(set(norm.std)) == 1:
        x = x.sub_(norm.mean[0]).div_(norm.std[0]).expand(-1, spec.channels, -1, -1)
    else:
        mean = torch.tensor(norm.mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(norm.std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        x = (x.expand(-1, spec.channels, -1, -1) - mean) / std
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def preprocess(images: Sequence[np.ndarray], spec: InputSpec, **options) -> torch.Tensor:
    """Frames of any size and colour → the model input: `to_color`, `resize`, then `normalize` (options go to it)."""
    return normalize(np.stack([frame_pixels(image, spec) for image in images]), spec, **options)


def frame_pixels(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """One frame → its uint8 model pixels: (S, S) gray or (3, S, S) RGB (`to_color`, `resize`, `planes`)."""
    return planes(resize(to_color(image, spec.color), spec.size))


def pixel_shape(spec: InputSpec) -> tuple[int, ...]:
    """The shape `frame_pixels` gives for `spec`."""
    return (3, spec.size, spec.size) if spec.color == "rgb" else (spec.size, spec.size)
