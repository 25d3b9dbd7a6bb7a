"""Backend selection: every CPU backend gives the events eager torch gives, through Engine and Runner.predict.

The reference is the training-time path (stripnet.preprocess.normalize on 3 replicated channels, the fused
module, softmax); each backend runs behind the engine's own preprocessing (gray folded into the first
convolution), so the comparison covers the whole CPU inference path the service uses.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from aiokafka import TopicPartition

from inspector.backends import BACKEND_NAMES
from inspector.cli import build_parser
from inspector.engine import BackendUnavailableError, Engine
from inspector.events import Frame, Record, defect_event
from inspector.settings import Settings
from schemas.checkpoint import InputSpec, Manifest
from schemas.messages import FrameHeaders
from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import RepNet, build_model
from stripnet.preprocess import normalize

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
ATOL = 1e-5  # on probabilities
MAX_BATCH = 3
HEAD_GAIN = 10.0
AT = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[RepNet, Manifest]:
    """A fused model whose outputs differ from frame to frame: at initialisation the network's output hardly
    depends on its input, so its BN statistics are measured on frames first (as training would) and the head
    is scaled up."""
    torch.manual_seed(0)
    model = build_model(EG_REPVGG, len(CLASSES))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for seed in (100, 101):
            pixels = torch.from_numpy(np.stack(gray_frames(16, seed=seed, sizes=(200,))))
            model(normalize(pixels, InputSpec()))
        model.head.fc.weight.mul_(HEAD_GAIN)
    root = tmp_path_factory.mktemp("engine-backends")
    export_checkpoint(model.eval(), root / "ckpt", class_names=CLASSES, model_name="t", model_version="v1")
    return load_checkpoint(root / "ckpt")


def gray_frames(n: int, seed: int = 0, sizes: tuple[int, ...] = (200, 256, 160)) -> list[np.ndarray]:
    """Blocky gray frames of mixed sizes (the engine resizes them to 200)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        size = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1), dtype=np.uint8)
        frames.append(np.kron(coarse, np.ones((8, 8), dtype=np.uint8))[:size, :size].copy())
    return frames


def as_frame(image: np.ndarray, i: int) -> Frame:
    record = Record(TopicPartition("frames", 0), i, b"cam-1", b"", (), AT, AT)
    headers = FrameHeaders(camera_id="cam-1", frame_id=f"f{i}", captured_at=AT, encoding="raw",
                           width=image.shape[1], height=image.shape[0])
    return Frame(record, headers, image)


def reference_probabilities(model: RepNet, manifest: Manifest, images: list[np.ndarray]) -> np.ndarray:
    """The training-time path: the engine's resize, to_input (gray replicated to 3 channels), softmax."""
    from inspector.engine import resize_gray

    pixels = torch.from_numpy(np.stack([resize_gray(im, manifest.input.size) for im in images]))
    x = normalize(pixels, manifest.input)
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1).numpy()


def events(probabilities: np.ndarray, images: list[np.ndarray], manifest: Manifest) -> list:
    return [defect_event(as_frame(im, i), p, manifest, threshold=0.5, inferred_at=AT)
            for i, (im, p) in enumerate(zip(images, probabilities, strict=True))]


def assert_same_events(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert (g.event_id, g.frame_id, g.label, g.status) == (e.event_id, e.frame_id, e.label, e.status)
        assert g.confidence == pytest.approx(e.confidence, abs=ATOL)
        assert g.probabilities.keys() == e.probabilities.keys()
        np.testing.assert_allclose(list(g.probabilities.values()), list(e.probabilities.values()), rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", [
    "torch", "onnxruntime", pytest.param("compile", marks=pytest.mark.slow),
])
def test_every_backend_gives_the_events_eager_torch_gives(fused: tuple[RepNet, Manifest], backend: str) -> None:
    model, manifest = fused
    engine = Engine("cpu", max_batch=MAX_BATCH, backend=backend)  # type: ignore[arg-type]
    runner = engine.prepare(model, manifest)
    assert (engine.backend, runner.backend) == (backend, backend)
    images = gray_frames(7)
    expected_probabilities = reference_probabilities(model, manifest, images)
    top2 = np.sort(expected_probabilities, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 10 * ATOL).all(), "labels must not hinge on the tolerance"
    assert np.ptp(expected_probabilities, axis=0).max() > 1e4 * ATOL, "frames must give different outputs"
    assert len({e.label for e in events(expected_probabilities, images, manifest)}) > 1
    got = np.concatenate([runner.predict(images[i:i + MAX_BATCH]).probabilities
                          for i in range(0, len(images), MAX_BATCH)])  # batches of 3, 3 and 1
    assert got.dtype == np.float32 and got.shape == (len(images), len(CLASSES))
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert_same_events(events(got, images, manifest), events(expected_probabilities, images, manifest))


def test_the_runner_does_not_change_the_callers_model(fused: tuple[RepNet, Manifest]) -> None:
    model, manifest = fused
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Engine("cpu", max_batch=1, backend="onnxruntime").prepare(model, manifest)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_locate_runs_torch_whatever_the_backend(fused: tuple[RepNet, Manifest]) -> None:
    from stripnet.cam import LocateConfig

    model, manifest = fused
    engine = Engine("cpu", max_batch=2, locate=LocateConfig(), backend="onnxruntime")
    runner = engine.prepare(model, manifest)
    assert (engine.requested_backend, engine.backend, runner.backend) == ("onnxruntime", "torch", "torch")
    images = gray_frames(2)
    prediction = runner.predict(images)
    assert prediction.boxes is not None and len(prediction.boxes) == 2
    np.testing.assert_allclose(prediction.probabilities, reference_probabilities(model, manifest, images),
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("module", ["onnxruntime", "onnx"])
def test_a_missing_onnx_runtime_is_a_clear_error_at_start_up(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(BackendUnavailableError, match=rf"backend 'onnxruntime' needs the Python package '{module}'"
                                                      r".*pip install .*--backend torch"):
        Engine("cpu", backend="onnxruntime")
    Engine("cpu", backend="torch")  # the others do not need it


def test_a_missing_onnx_runtime_makes_inspector_run_exit_2_with_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from inspector.cli import main

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.chdir(tmp_path)  # no stray .env
    code = main(["run", "--backend", "onnxruntime", "--device", "cpu", "--bootstrap-servers", "127.0.0.1:1",
                 "--http-port", "0", "--log-level", "error"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("inspector run: error: backend 'onnxruntime' needs the Python package 'onnxruntime'")
    assert "Traceback" not in err


def test_setting_environment_and_flag_name_the_same_backends(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INSPECTOR_BACKEND", raising=False)
    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
                   if a.dest == "backend")
    assert set(choices) == set(BACKEND_NAMES) == set(Settings.model_fields["backend"].annotation.__args__)
    monkeypatch.setenv("INSPECTOR_BACKEND", "compile")
    assert Settings().backend == "compile"
    with pytest.raises(ValueError):
        Settings(backend="tensorrt")
