"""The CUDA runner: the CPU's predictions, uploads as the design says, a hot reload that frees the old model,
and the batch limit. Needs a CUDA device (skipped without one); scripts/gpu-check runs these.

The reference is the CPU path the tests/inspector suite already holds to the training-time path (eager
torch, fp32), on the bundled trained model, with NEU-CLS images when present (tests/helpers/gpu.py).
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from inspector.metrics import Metrics
from inspector.model_store import ModelStore
from inspector.runners import CudaRunner, Loader, Runner, RunnerOptions
from inspector.settings import Settings
from schemas.checkpoint import Manifest
from stripnet.bundled import resolve_model_dir
from stripnet.checkpoint import load_checkpoint
from stripnet.network import RepNet
from stripnet.preprocess import pixel_shape
from tests.helpers.gpu import Frames, default_stream_id, gpu_activities, reference_frames, requires_cuda
from tests.helpers.models import version_dir_name, with_version

pytestmark = [pytest.mark.gpu, requires_cuda]

MAX_BATCH = 64
FP32_ATOL = 1e-4  # on probabilities
# 16-bit labels are judged where the CPU's two best probabilities are at least this far apart: nearer ties
# may flip in float16/bfloat16 without anything being wrong.
MIN_MARGIN = 0.1


@pytest.fixture(scope="module")
def bundled() -> tuple[RepNet, Manifest]:
    return load_checkpoint(resolve_model_dir("default"))


@pytest.fixture(scope="module")
def frames() -> Frames:
    return reference_frames()


def predict_all(runner: Runner, images: list[np.ndarray], batch: int = MAX_BATCH) -> np.ndarray:
    return np.concatenate([runner.predict(images[i:i + batch]).probabilities for i in range(0, len(images), batch)])


@pytest.fixture(scope="module")
def cpu_probabilities(bundled: tuple[RepNet, Manifest], frames: Frames) -> np.ndarray:
    runner = Loader(Settings(device="cpu", backend="torch", max_batch=MAX_BATCH, threads=None)).load(*bundled)
    return predict_all(runner, frames.images)


def cuda_runner(bundled: tuple[RepNet, Manifest], dtype: torch.dtype = torch.float32,
                max_batch: int = MAX_BATCH) -> CudaRunner:
    model, manifest = bundled
    return CudaRunner(model, manifest, RunnerOptions(torch.device("cuda"), max_batch, dtype=dtype))


# -- the CPU's predictions ----------------------------------------------------------------------------------


def test_fp32_on_cuda_gives_the_cpu_probabilities(bundled: tuple[RepNet, Manifest], frames: Frames,
                                                  cpu_probabilities: np.ndarray) -> None:
    runner = Loader(Settings(device="cuda", max_batch=MAX_BATCH)).load(*bundled)  # as `inspector run` builds it
    assert isinstance(runner, CudaRunner) and runner.dtype == torch.float32
    got = predict_all(runner, frames.images)
    np.testing.assert_allclose(got, cpu_probabilities, rtol=0, atol=FP32_ATOL, err_msg=frames.source)
    assert (got.argmax(axis=1) == cpu_probabilities.argmax(axis=1)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_bit_on_cuda_gives_the_cpu_labels(bundled: tuple[RepNet, Manifest], frames: Frames,
                                            cpu_probabilities: np.ndarray, dtype: torch.dtype) -> None:
    got = predict_all(cuda_runner(bundled, dtype), frames.images)
    top2 = np.sort(cpu_probabilities, axis=1)[:, -2:]
    judged = top2[:, 1] - top2[:, 0] >= MIN_MARGIN
    assert judged.mean() >= (0.9 if frames.real else 0.5), f"too few clear-cut frames to judge: {frames.source}"
    differ = np.flatnonzero(judged & (got.argmax(axis=1) != cpu_probabilities.argmax(axis=1)))
    assert differ.size == 0, (f"{dtype}: {differ.size} of {judged.sum()} labels differ from the CPU's "
                              f"({frames.source}); largest probability difference "
                              f"{np.abs(got - cpu_probabilities).max():.3g}")


def test_locate_on_cuda_gives_the_cpu_probabilities_and_boxes(bundled: tuple[RepNet, Manifest],
                                                             frames: Frames) -> None:
    images = frames.images[:32]
    on_cpu = Loader(Settings(device="cpu", locate=True, max_batch=32)).load(*bundled).predict(images)
    on_cuda = Loader(Settings(device="cuda", locate=True, max_batch=32)).load(*bundled).predict(images)
    np.testing.assert_allclose(on_cuda.probabilities, on_cpu.probabilities, rtol=0, atol=FP32_ATOL)
    assert on_cuda.boxes is not None and on_cpu.boxes is not None

    def corners(boxes: tuple) -> list[tuple[int, int, int, int]]:
        return [(b.x0, b.y0, b.x1, b.y1) for b in boxes]

    same = sum(corners(g) == corners(c) for g, c in zip(on_cuda.boxes, on_cpu.boxes, strict=True))
    assert same >= 0.9 * len(images), f"boxes match the CPU's on {same} of {len(images)} frames"


# -- uploads ------------------------------------------------------------------------------------------------


def test_frames_go_up_as_uint8_from_pinned_memory_on_the_runners_own_stream(bundled: tuple[RepNet, Manifest],
                                                                           frames: Frames) -> None:
    runner, batch = cuda_runner(bundled), frames.images[:MAX_BATCH]
    runner.predict(batch)  # cuDNN's plans and the allocator's blocks exist before the trace
    default = default_stream_id()
    activities = gpu_activities(lambda: runner.predict(batch))
    uploads = [a for a in activities if a.host_to_device]
    kernels = [a for a in activities if a.kind == "kernel"]
    assert uploads and kernels
    assert all(a.pinned for a in uploads), [a.name for a in uploads]
    pixels = int(np.prod(pixel_shape(bundled[1].input)))
    assert sum(a.bytes or 0 for a in uploads) == len(batch) * pixels  # uint8 pixels, and nothing else
    streams = {a.stream for a in uploads + kernels}
    assert len(streams) == 1 and default not in streams, (streams, default)


def test_a_reloads_upload_overlaps_the_serving_streams_compute(bundled: tuple[RepNet, Manifest],
                                                              frames: Frames) -> None:
    """Serving runs on a non-blocking stream of its own, so the next model's weights (copied on the default stream
    by the model store's thread) go up while serving computes, and neither waits for the other. A batch's own upload
    cannot overlap its own forward pass (which needs the pixels), and the service has one batch in flight."""
    model, manifest = bundled
    loader = Loader(Settings(device="cuda", max_batch=256))
    serving = loader.load(model, manifest)
    batch = (frames.images * (256 // len(frames.images) + 1))[:256]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            serving.predict(batch)

    def reload_while_serving() -> None:
        thread = threading.Thread(target=serve)
        thread.start()
        try:
            for _ in range(3):
                loader.load(model, manifest)
        finally:
            stop.set()
            thread.join()

    activities = gpu_activities(reload_while_serving)
    kernels = [a for a in activities if a.kind == "kernel"]
    serving_stream = max({k.stream for k in kernels}, key=lambda s: sum(k.stream == s for k in kernels))
    weights = [a for a in activities if a.host_to_device and a.stream != serving_stream]
    computing = [k for k in kernels if k.stream == serving_stream]
    assert weights, "no weight upload outside the serving stream"
    assert any(w.overlaps(k) for w in weights for k in computing), (
        f"none of {len(weights)} weight uploads overlapped any of {len(computing)} serving kernels")


# -- hot reload and limits ----------------------------------------------------------------------------------


def settled_allocation() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def test_a_hot_reload_on_cuda_frees_the_old_models_memory(bundled: tuple[RepNet, Manifest], tmp_path: Path) -> None:
    source = resolve_model_dir("default")
    with_version(source, tmp_path / version_dir_name(1, "v1"), "v1")
    store = ModelStore(tmp_path, Loader(Settings(device="cuda", max_batch=MAX_BATCH)).load, metrics=Metrics())
    store.load_initial()
    model_bytes = sum(t.numel() * t.element_size() for t in bundled[0].state_dict().values())
    allocated = [settled_allocation()]
    for k in range(2, 6):
        with_version(source, tmp_path / version_dir_name(k, f"v{k}"), f"v{k}")
        assert store.poll() is not None and store.current is not None and store.current.version == f"v{k}"
        allocated.append(settled_allocation())
    grown = max(allocated) - allocated[0]
    assert grown <= model_bytes // 2, (f"allocated bytes after each swap {allocated}: +{grown} over one model's "
                                       f"{model_bytes}; an old model (or a workspace per swap) was kept")


def test_every_model_of_a_loader_runs_on_its_one_stream_in_the_configured_precision(
        bundled: tuple[RepNet, Manifest]) -> None:
    loader = Loader(Settings(device="cuda", fp16=True, max_batch=8))
    first, second = loader.load(*bundled), loader.load(*bundled)
    assert isinstance(first, CudaRunner) and isinstance(second, CudaRunner)
    assert first.stream is second.stream and first.stream != torch.cuda.default_stream()
    assert first.dtype == second.dtype == torch.float16


def test_a_batch_larger_than_max_batch_is_refused_on_cuda(bundled: tuple[RepNet, Manifest], frames: Frames) -> None:
    runner = cuda_runner(bundled, max_batch=4)
    with pytest.raises(ValueError, match=r"batch of 5 frames; this runner takes 1\.\.4"):
        runner.predict(frames.images[:5])
    with pytest.raises(ValueError, match=r"takes 1\.\.4"):
        runner.predict([])
    assert runner.predict(frames.images[:4]).probabilities.shape == (4, len(bundled[1].class_names))
