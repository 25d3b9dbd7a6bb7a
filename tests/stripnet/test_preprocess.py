"""The one preprocessing: the numbers of (x/255 − mean)/std on replicated gray, whatever path computes them."""

import numpy as np
import pytest
import torch

from schemas.checkpoint import InputSpec, Normalization
from stripnet.preprocess import normalize, preprocess, resize

SHARED = InputSpec()
PER_CHANNEL = InputSpec(normalization=Normalization(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)))


def pixels(n: int = 3, size: int = 200, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def by_hand(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    x = images[:, None].astype(np.float64) / 255.0
    mean = np.asarray(spec.normalization.mean).reshape(1, -1, 1, 1)
    std = np.asarray(spec.normalization.std).reshape(1, -1, 1, 1)
    return (np.repeat(x, spec.channels, axis=1) - mean) / std


@pytest.mark.parametrize("spec", [SHARED, PER_CHANNEL], ids=["shared", "per-channel"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_replicates_gray_and_normalizes_each_channel(spec: InputSpec, channels_last: bool) -> None:
    images = pixels()
    x = normalize(images, spec, channels_last=channels_last)
    assert x.shape == (3, 3, 200, 200) and x.dtype == torch.float32
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert x.is_contiguous(memory_format=layout)
    np.testing.assert_allclose(x.numpy(), by_hand(images, spec), rtol=0, atol=1e-6)


def test_normalize_takes_tensors_and_other_dtypes() -> None:
    images = pixels(2)
    half = normalize(torch.from_numpy(images), SHARED, dtype=torch.float16)
    assert half.dtype == torch.float16
    np.testing.assert_allclose(half.float().numpy(), by_hand(images, SHARED), rtol=0, atol=1e-2)


def test_one_channel_spec_gives_the_first_plane_of_the_replicated_input() -> None:
    images = pixels(2)
    gray = InputSpec(channels=1, normalization=Normalization(mean=(0.5,), std=(0.25,)))
    torch.testing.assert_close(normalize(images, gray), normalize(images, SHARED)[:, :1], rtol=0, atol=0)


def test_resize_shrinks_by_area_enlarges_bilinearly_and_keeps_the_right_size() -> None:
    checker = (np.indices((400, 400)).sum(axis=0) % 2 * 255).astype(np.uint8)
    assert resize(checker, 200).shape == (200, 200)
    assert np.abs(resize(checker, 200).astype(int) - 128).max() <= 1  # area averages each 2×2 cell
    small = pixels(1, 50)[0]
    assert resize(small, 200).shape == (200, 200)
    same = pixels(1)[0]
    assert resize(same, 200) is same


def test_preprocess_is_resize_then_normalize_for_frames_of_any_size() -> None:
    frames = [pixels(1, 200, 1)[0], np.zeros((300, 420), np.uint8), np.full((64, 80), 255, np.uint8)]
    x = preprocess(frames, SHARED)
    expected = normalize(np.stack([resize(f, 200) for f in frames]), SHARED)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert x[1].max() == pytest.approx(-2.0) and x[2].min() == pytest.approx(2.0)
