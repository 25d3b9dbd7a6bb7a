"""The one preprocessing: the numbers of (x/255 − mean)/std on replicated gray, whatever path computes them."""

import cv2
import numpy as np
import pytest
import torch

from schemas.checkpoint import InputSpec, Normalization
from stripnet.architectures import EG_REPVGG
from stripnet.network import build_model, can_fold_gray, fold_gray, reparameterize
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


RGB = InputSpec(color="rgb", normalization=Normalization(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)))


def test_rgb_frames_become_planes_normalized_per_channel_in_rgb_order() -> None:
    frames = list(np.random.default_rng(3).integers(0, 256, (2, 200, 200, 3), dtype=np.uint8))
    x = preprocess(frames, RGB)
    planes_first = np.stack(frames).transpose(0, 3, 1, 2).astype(np.float64) / 255.0
    mean = np.asarray(RGB.normalization.mean).reshape(1, 3, 1, 1)
    std = np.asarray(RGB.normalization.std).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(x.numpy(), (planes_first - mean) / std, rtol=0, atol=1e-6)


def test_each_model_gets_its_own_colour_whatever_the_frame() -> None:
    """A gray frame for a colour model is replicated; a colour frame for a gray model becomes BT.601 luma."""
    gray = pixels(1)[0]
    torch.testing.assert_close(preprocess([gray], RGB), preprocess([np.repeat(gray[..., None], 3, axis=2)], RGB))
    colour = np.random.default_rng(4).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    luma = cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY)
    torch.testing.assert_close(preprocess([colour], SHARED), preprocess([luma], SHARED), rtol=0, atol=0)
    with pytest.raises(ValueError, match="gray model"):
        normalize(colour.transpose(2, 0, 1)[None], SHARED)


def test_gray_frames_give_the_same_input_and_outputs_as_before_the_colour_path() -> None:
    """The gray path is pinned: (x/255 − 0.5)/0.25 on the replicated plane, and the folded first convolution
    gives the unfolded model's outputs; a colour model is never folded."""
    frames = list(pixels(4, 64, seed=5))
    spec = InputSpec(size=64)
    x = preprocess(frames, spec)
    np.testing.assert_allclose(x.numpy(), by_hand(np.stack(frames), spec), rtol=0, atol=1e-6)
    torch.manual_seed(0)
    fused = reparameterize(build_model(EG_REPVGG, 6))
    folded, one = fold_gray(fused, spec)
    assert one.channels == 1 and not can_fold_gray(InputSpec(size=64, color="rgb"))
    with torch.no_grad():
        torch.testing.assert_close(folded(preprocess(frames, one)), fused(x), rtol=1e-4, atol=1e-4)
