"""Inference backends: each computes what eager torch computes on the fused model (atol 1e-4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inspector.backends import BACKEND_NAMES, fold_gray_input, make_backend
from schemas.checkpoint import InputSpec, Manifest, Normalization
from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import RepNet, build_model
from stripnet.preprocess import normalize
from tests.models import randomize_bn

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _checkpoint(root: Path, input_spec: InputSpec = InputSpec()) -> tuple[RepNet, Manifest]:
    torch.manual_seed(0)
    export_checkpoint(randomize_bn(build_model(EG_REPVGG, len(CLASSES))), root / "ckpt", class_names=CLASSES,
                      model_name="t", model_version="v1", input_spec=input_spec)
    return load_checkpoint(root / "ckpt")


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[RepNet, Manifest]:
    return _checkpoint(tmp_path_factory.mktemp("backends"))


def _pixels(batch: int, manifest: Manifest, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    size = manifest.input.size
    return torch.randint(0, 256, (batch, size, size), dtype=torch.uint8, generator=gen)


def _frames(batch: int, manifest: Manifest, seed: int = 1) -> torch.Tensor:
    """Normalized gray frames replicated to the manifest's channels, as training prepares them."""
    return normalize(_pixels(batch, manifest, seed), manifest.input)


def _eager(model: RepNet, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).numpy()


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
@pytest.mark.parametrize("fold_gray", [False, True])
def test_backend_matches_eager_torch(fused: tuple[RepNet, Manifest], name: str, fold_gray: bool) -> None:
    model, manifest = fused
    backend = make_backend(name, model, manifest, batch_sizes=(1, 3), fold_gray=fold_gray)
    assert backend.name == name
    assert backend.in_channels == (1 if fold_gray else 3)
    for batch in (1, 3, 5):  # 5: a batch size the backend was not warmed up with
        x = _frames(batch, manifest, seed=batch)
        expected = _eager(model, x)
        assert np.abs(expected).max() > 0.1  # logits carry signal, so the comparison means something
        fed = x[:, :1] if fold_gray else x
        prepared = backend.prepare(_pixels(batch, manifest, seed=batch).numpy())
        for arg in (fed.numpy(), fed, fed.contiguous(memory_format=torch.channels_last), prepared):
            logits = backend(arg)
            assert logits.dtype == np.float32 and logits.shape == (batch, len(CLASSES))
            np.testing.assert_allclose(logits, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
@pytest.mark.parametrize("fold_gray", [False, True])
def test_prepare_is_the_training_preprocessing_in_the_backends_layout(
    fused: tuple[RepNet, Manifest], name: str, fold_gray: bool,
) -> None:
    model, manifest = fused
    backend = make_backend(name, model, manifest, fold_gray=fold_gray)
    pixels = _pixels(4, manifest)
    x = backend.prepare(pixels)
    expected = _frames(4, manifest)[:, : backend.in_channels]
    np.testing.assert_allclose(np.asarray(x), expected.numpy(), rtol=0, atol=1e-6)
    if name == "torch":
        assert isinstance(x, torch.Tensor) and x.is_contiguous(memory_format=torch.channels_last)
    else:
        assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous


def test_prepare_normalizes_each_channel_with_its_own_statistics(tmp_path: Path) -> None:
    spec = InputSpec(normalization=Normalization(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)))
    model, manifest = _checkpoint(tmp_path, spec)
    backend = make_backend("onnxruntime", model, manifest)
    pixels = _pixels(2, manifest)
    expected = normalize(pixels, spec)
    np.testing.assert_allclose(backend.prepare(pixels), expected.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(backend(backend.prepare(pixels)), _eager(model, expected), rtol=0, atol=ATOL)


@pytest.mark.slow
def test_compile_backend_matches_eager_torch(fused: tuple[RepNet, Manifest]) -> None:
    model, manifest = fused
    backend = make_backend("compile", model, manifest, batch_sizes=(2,))
    x = _frames(2, manifest)
    np.testing.assert_allclose(backend(x), _eager(model, x), rtol=0, atol=ATOL)


def test_backend_leaves_the_callers_model_alone(fused: tuple[RepNet, Manifest]) -> None:
    model, manifest = fused
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_backend("torch", model, manifest, fold_gray=True)
    assert model.blocks[0].reparam_conv.in_channels == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_folded_model_takes_one_channel(fused: tuple[RepNet, Manifest]) -> None:
    model, manifest = fused
    folded = fold_gray_input(model, manifest)
    x = _frames(2, manifest)
    np.testing.assert_allclose(_eager(folded, x[:, :1]), _eager(model, x), rtol=0, atol=ATOL)
    assert folded.blocks[0].reparam_conv.weight.shape[1] == 1


def test_fold_gray_refuses_per_channel_normalization(tmp_path: Path) -> None:
    spec = InputSpec(normalization=Normalization(mean=(0.4, 0.5, 0.6), std=(0.25, 0.25, 0.25)))
    model, manifest = _checkpoint(tmp_path, spec)
    with pytest.raises(ValueError, match="same mean and std"):
        make_backend("torch", model, manifest, fold_gray=True)


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_wrong_input_shape_is_a_clear_error(fused: tuple[RepNet, Manifest], name: str) -> None:
    model, manifest = fused
    backend = make_backend(name, model, manifest, fold_gray=True)
    with pytest.raises(ValueError, match=r"takes \(N, 1, 200, 200\) input, got \(2, 3, 200, 200\)"):
        backend(np.zeros((2, 3, 200, 200), dtype=np.float32))


def test_unknown_backend_and_unfused_model_are_refused(fused: tuple[RepNet, Manifest]) -> None:
    model, manifest = fused
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        make_backend("tensorrt", model, manifest)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fused models"):
        make_backend("torch", build_model(EG_REPVGG, len(CLASSES)), manifest)
    assert set(BACKEND_NAMES) == {"torch", "onnxruntime", "compile"}
