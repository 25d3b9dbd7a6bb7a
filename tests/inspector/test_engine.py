import numpy as np
import pytest
import torch

from inspector.engine import Engine, resize_gray, resolve_device
from stripnet.checkpoint import load_checkpoint
from stripnet.preprocess import normalize
from trainer.data import read_gray


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(published_model_dir):
    (version,) = published_model_dir.iterdir()
    return load_checkpoint(version)


def frames(n: int, size: int = 200, seed: int = 0) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8))


def test_predictions_match_the_training_preprocessing_and_forward(checkpoint, neu_cls):
    model, manifest = checkpoint
    runner = Engine("cpu", max_batch=3).prepare(model, manifest)
    paths = sorted((neu_cls / "scratches").iterdir())[:3]
    images = [read_gray(p, manifest.input.size) for p in paths]
    x = normalize(torch.from_numpy(np.stack(images)), manifest.input)
    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=1).numpy()
    got = runner.predict(images).probabilities
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_frames_of_other_sizes_are_resized_like_training(checkpoint):
    model, manifest = checkpoint
    runner = Engine("cpu", max_batch=2).prepare(model, manifest)
    big, small = frames(1, 400)[0], frames(1, 100, seed=1)[0]
    assert resize_gray(big, 200).shape == (200, 200) and resize_gray(small, 200).shape == (200, 200)
    direct = runner.predict([resize_gray(big, 200), resize_gray(small, 200)]).probabilities
    np.testing.assert_allclose(runner.predict([big, small]).probabilities, direct, atol=1e-6)


def test_batch_sizes_outside_the_warmed_range_are_refused(checkpoint):
    model, manifest = checkpoint
    runner = Engine("cpu", max_batch=2).prepare(model, manifest)
    with pytest.raises(ValueError):
        runner.predict(frames(3))
    with pytest.raises(ValueError):
        runner.predict([])


def test_prepare_refuses_a_model_with_non_finite_outputs(checkpoint):
    model, manifest = checkpoint
    broken = type(model)(model.spec, model.num_classes, deploy=True)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.head.fc.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        Engine("cpu", max_batch=2).prepare(broken.eval(), manifest)


def test_locate_adds_boxes_in_frame_pixels(checkpoint):
    from stripnet.cam import LocateConfig

    model, manifest = checkpoint
    runner = Engine("cpu", max_batch=2, locate=LocateConfig()).prepare(model, manifest)
    prediction = runner.predict([frames(1, 300)[0], frames(1, 200)[0]])
    assert prediction.boxes is not None and len(prediction.boxes) == 2
    for boxes, (h, w) in zip(prediction.boxes, [(300, 300), (200, 200)], strict=True):
        assert all(0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h for b in boxes)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
