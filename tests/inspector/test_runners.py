"""Runners: every backend gives the events the training-time path gives; the choice is made once, from the
settings; a model load warms up once and refuses non-finite outputs.

The reference is the training-time path: stripnet.preprocess on the manifest's 3 replicated channels, the
fused module, softmax. Each runner goes through its own preprocessing (gray folded into the first
convolution where that is exact), so the comparison covers the whole CPU inference path the service uses.
"""

from __future__ import annotations

import sys
import typing
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from aiokafka import TopicPartition
from pydantic import ValidationError

from inspector.cli import main, parse
from inspector.decode import Decoded, DecodeLimits, decode_frame
from inspector.outputs import Thresholds, defect_event
from inspector.records import Frame, Record
from inspector.runners import (
    RUNNERS, BackendUnavailableError, Bf16Runner, CompiledRunner, Loader, OnnxRuntimeRunner, RunnerOptions,
    TorchRunner,
)
from inspector.settings import Settings
from schemas.checkpoint import InputSpec, Manifest, Normalization, OODSpec
from schemas.messages import FrameHeaders
from stripnet.architectures import EG_REPVGG
from stripnet.cam import LocateConfig, locate_batch
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import RepNet, build_model
from stripnet.ood import combine, correlation_dim, fit_correlation_knn, fit_head, fit_knn, with_detector
from stripnet.preprocess import normalize, preprocess
from tests.helpers import NEU_CLASSES
from tests.helpers.models import randomize_bn, with_random_head
from trainer.data import read_gray

ATOL = 1e-5  # on probabilities
MAX_BATCH = 3
HEAD_GAIN = 10.0
AT = datetime(2025, 1, 1, tzinfo=UTC)


def cpu(**overrides) -> Settings:
    """fp32 unless a test names its backend: these tests hold runners to fp32 tolerances (bf16: test_precision)."""
    return Settings(**({"device": "cpu", "max_batch": MAX_BATCH, "backend": "onnxruntime"} | overrides))


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[RepNet, Manifest]:
    """A fused model whose outputs differ from frame to frame: at initialisation the network's output hardly
    depends on its input, so its BN statistics are measured on frames first (as training would) and the head
    is scaled up."""
    torch.manual_seed(0)
    model = build_model(EG_REPVGG, len(NEU_CLASSES))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for seed in (100, 101):
            model(preprocess(gray_frames(16, seed=seed, sizes=(200,)), InputSpec()))
        model.head.fc.weight.mul_(HEAD_GAIN)
    root = tmp_path_factory.mktemp("runners")
    export_checkpoint(model.eval(), root / "ckpt", class_names=NEU_CLASSES, model_name="t", model_version="v1")
    return load_checkpoint(root / "ckpt")


def gray_frames(n: int, seed: int = 0, sizes: tuple[int, ...] = (200, 256, 160)) -> list[np.ndarray]:
    """Blocky gray frames of mixed sizes (runners resize them to 200)."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        size = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, (size // 8 + 1, size // 8 + 1), dtype=np.uint8)
        frames.append(np.kron(coarse, np.ones((8, 8), dtype=np.uint8))[:size, :size].copy())
    return frames


def reference_probabilities(model: RepNet, manifest: Manifest, images: list[np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model(preprocess(images, manifest.input)), dim=1).numpy()


def events(probabilities: np.ndarray, images: list[np.ndarray], manifest: Manifest) -> list:
    def frame(image: np.ndarray, i: int) -> Frame:
        headers = FrameHeaders(camera_id="cam-1", frame_id=f"f{i}", captured_at=AT, encoding="raw",
                               width=image.shape[1], height=image.shape[0])
        return Frame(Record(TopicPartition("frames", 0), i, b"cam-1", b"", (), AT, AT), headers, image)

    return [defect_event(frame(im, i), p, manifest, thresholds=Thresholds(0.5), inferred_at=AT)
            for i, (im, p) in enumerate(zip(images, probabilities, strict=True))]


# -- what a runner computes ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", pytest.param("compile", marks=pytest.mark.slow)])
def test_every_backend_gives_the_events_the_training_path_gives(fused: tuple[RepNet, Manifest], backend: str) -> None:
    model, manifest = fused
    loader = Loader(cpu(backend=backend))
    runner = loader.load(model, manifest)
    assert runner.name == backend
    images = gray_frames(7)
    expected = reference_probabilities(model, manifest, images)
    top2 = np.sort(expected, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 10 * ATOL).all(), "labels must not hinge on the tolerance"
    assert np.ptp(expected, axis=0).max() > 1e4 * ATOL, "frames must give different outputs"
    got = np.concatenate([runner.predict(images[i:i + MAX_BATCH]).probabilities
                          for i in range(0, len(images), MAX_BATCH)])  # batches of 3, 3 and 1
    assert got.dtype == np.float32 and got.shape == (len(images), len(NEU_CLASSES))
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    for g, e in zip(events(got, images, manifest), events(expected, images, manifest), strict=True):
        assert (g.event_id, g.label, g.status) == (e.event_id, e.label, e.status)
        np.testing.assert_allclose(list(g.probabilities.values()), list(e.probabilities.values()), atol=ATOL)
    assert len({e.label for e in events(expected, images, manifest)}) > 1


def with_fitted_detector(model: RepNet, manifest: Manifest, method: str = "mahalanobis") -> tuple[RepNet, Manifest]:
    """The model with an unknown detector fitted on its own features of a few frames (combined: with a kNN part
    on two blocks and a correlation part on each of three, as the bundled model has them: two of one width, one
    of another)."""
    last = len(model.spec.blocks) - 1
    combined = method == "combined"
    spec = OODSpec(method=method, layer=last if method == "knn" else 1,
                   knn_layers=(2, last) if combined else (), per_class=combined,
                   corr_layers=(2, 3, 4) if combined else (), corr_dims=4 if combined else 0, neighbours=3,
                   threshold=1.0, false_unknown_rate=0.01, calibrated_on="training", calibration_images=24,
                   fitted_images=24)
    with torch.inference_mode():
        logits, stats = model.forward_with_features(preprocess(gray_frames(24, seed=5), manifest.input), spec.layers,
                                                    spec.corr_layers)
    classes = len(manifest.class_names)
    channels = [model.spec.blocks[b].out_channels for b in spec.blocks]
    widths = [2 * c for c in channels[:len(spec.layers)]] + [correlation_dim(c) for c in channels[len(spec.layers):]]
    bounds = np.cumsum([0, *widths]).tolist()
    if method == "knn":
        head = fit_knn(stats, 3)
    elif method == "mahalanobis":
        head = fit_head(stats, torch.arange(24) % classes, classes)
    else:
        texture = fit_head(stats[:, :bounds[1]], torch.arange(24) % classes, classes)
        columns = [stats[:, a:b] for a, b in zip(bounds[1:], bounds[2:])]
        knns = [fit_knn(c, 3) for c in columns[:2]] + [fit_correlation_knn(c, 3, 4) for c in columns[2:]]
        with torch.inference_mode():
            parts = [texture(stats[:, :bounds[1]]), *(k(c) for k, c in zip(knns, columns))]
            head = combine(texture, knns, torch.stack(parts, dim=1), logits.argmax(dim=1), classes)
    return with_detector(model, head, spec), manifest.model_copy(update={"ood": spec})


@pytest.mark.parametrize(("runner_class", "locate", "rtol", "method"), [
    *((runner, locate, rtol, method) for runner, locate, rtol in (
        (TorchRunner, None, 1e-4), (TorchRunner, LocateConfig(), 1e-4), (OnnxRuntimeRunner, None, 1e-4),
        (Bf16Runner, None, 2e-2)) for method in ("mahalanobis", "knn", "combined")),
    # torch.compile once, on the detector with every kind of part (it once failed on two correlation parts)
    pytest.param(CompiledRunner, None, 1e-4, "combined", marks=pytest.mark.slow)])
def test_a_runner_scores_unknowns_in_the_same_pass_as_the_reference_does(
        fused: tuple[RepNet, Manifest], runner_class: type, locate: LocateConfig | None, rtol: float,
        method: str) -> None:
    model, manifest = with_fitted_detector(*fused, method)
    runner = runner_class(model, manifest, RunnerOptions(torch.device("cpu"), MAX_BATCH, locate=locate))
    images = gray_frames(MAX_BATCH, seed=9)
    with torch.inference_mode():
        logits, stats = model.forward_with_features(preprocess(images, manifest.input), manifest.ood.layers,
                                                    manifest.ood.corr_layers)
        expected = model.ood(stats, logits).numpy()
    got = runner.predict(images).ood_scores
    assert got is not None and got.shape == (MAX_BATCH,)
    # combined divides each distance by its held-in spread, then the sum by its predicted class's (small for these
    # 24 frames of an untrained network), which magnifies float noise; bf16's most (on the bundled model's detector
    # fitted on 240 NEU images, bf16 moves the score by at most 0.025, with no flag changed)
    combined = method == "combined"
    atol = (5e-2 if runner_class is Bf16Runner else 1e-3) if combined else 0
    np.testing.assert_allclose(got, expected, rtol=rtol * (10 if combined else 1), atol=atol)
    assert runner_class(*fused, RunnerOptions(torch.device("cpu"), MAX_BATCH)).predict(images).ood_scores is None


def test_a_dataset_file_decoded_for_serving_is_classified_as_training_reads_it(
        fused: tuple[RepNet, Manifest], neu_cls: Path) -> None:
    model, manifest = fused
    runner = Loader(cpu()).load(model, manifest)
    paths = sorted((neu_cls / "scratches").iterdir())[:MAX_BATCH]
    headers = FrameHeaders(camera_id="c", frame_id="f", captured_at=AT, encoding="jpeg").to_kafka()
    served = [decode_frame(headers, p.read_bytes(), DecodeLimits(1 << 20, 1 << 20)) for p in paths]
    assert all(isinstance(d, Decoded) for d in served)
    x = normalize(np.stack([read_gray(p, manifest.input.size) for p in paths]), manifest.input)
    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(runner.predict([d.image for d in served]).probabilities, expected, atol=ATOL)


@pytest.mark.parametrize("runner_class", [TorchRunner, OnnxRuntimeRunner])
def test_folding_gray_into_the_first_convolution_changes_nothing_but_the_input_channels(
        fused: tuple[RepNet, Manifest], runner_class: type) -> None:
    model, manifest = fused
    folded = runner_class(model, manifest, RunnerOptions(torch.device("cpu"), MAX_BATCH))
    plain = runner_class(model, manifest, RunnerOptions(torch.device("cpu"), MAX_BATCH, fold_gray=False))
    assert (folded.spec.channels, plain.spec.channels) == (1, 3)
    pixels = np.stack(gray_frames(3, sizes=(200,)))
    np.testing.assert_allclose(folded.forward(folded.prepare(pixels)), plain.forward(plain.prepare(pixels)),
                               rtol=0, atol=1e-4)


def test_per_channel_normalization_is_served_unfolded_and_right(tmp_path: Path) -> None:
    spec = InputSpec(normalization=Normalization(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)))
    torch.manual_seed(0)
    export_checkpoint(randomize_bn(build_model(EG_REPVGG, len(NEU_CLASSES))), tmp_path / "ckpt",
                      class_names=NEU_CLASSES, model_name="t", model_version="v1", input_spec=spec)
    model, manifest = load_checkpoint(tmp_path / "ckpt")
    runner = Loader(cpu(backend="onnxruntime")).load(model, manifest)
    assert runner.spec.channels == 3
    images = gray_frames(2, sizes=(200,))
    np.testing.assert_allclose(runner.predict(images).probabilities,
                               reference_probabilities(model, manifest, images), rtol=0, atol=ATOL)


def test_frames_of_other_sizes_are_resized_like_training(fused: tuple[RepNet, Manifest]) -> None:
    model, manifest = fused
    runner = Loader(cpu()).load(model, manifest)
    big, small = gray_frames(1, sizes=(400,))[0], gray_frames(1, seed=1, sizes=(100,))[0]
    np.testing.assert_allclose(runner.predict([big, small]).probabilities,
                               reference_probabilities(model, manifest, [big, small]), atol=ATOL)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", pytest.param("compile", marks=pytest.mark.slow)])
def test_batch_sizes_outside_1_to_max_batch_are_refused(fused: tuple[RepNet, Manifest], backend: str) -> None:
    runner = Loader(cpu(backend=backend)).load(*fused)  # the CUDA runner: tests/gpu
    for batch in ([], gray_frames(MAX_BATCH + 1)):
        with pytest.raises(ValueError, match=rf"takes 1..{MAX_BATCH}"):
            runner.predict(batch)


def test_locate_runs_torch_whatever_the_backend_and_adds_boxes_in_frame_pixels(
        fused: tuple[RepNet, Manifest]) -> None:
    model, manifest = fused
    loader = Loader(cpu(backend="onnxruntime", locate=True))
    runner = loader.load(model, manifest)
    assert (loader.runner, runner.name) == (TorchRunner, "torch")
    images = gray_frames(2, sizes=(300, 200))
    prediction = runner.predict(images)
    assert prediction.boxes is not None and len(prediction.boxes) == 2
    for boxes, (h, w) in zip(prediction.boxes, [(300, 300), (200, 200)], strict=True):
        assert boxes and all(0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h for b in boxes)
    np.testing.assert_allclose(prediction.probabilities, reference_probabilities(model, manifest, images),
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "bf16"])
def test_a_model_with_a_localization_head_serves_its_boxes_with_locate_and_ignores_it_without(
        fused: tuple[RepNet, Manifest], backend: str, tmp_path: Path) -> None:
    model, manifest = fused
    export_checkpoint(with_random_head(model), tmp_path / "head", class_names=manifest.class_names,
                      model_name="t", model_version="v1")
    headed, headed_manifest = load_checkpoint(tmp_path / "head")
    images = gray_frames(3, sizes=(300, 200))
    located = Loader(cpu(backend=backend, locate=True)).load(headed, headed_manifest).predict(images)
    x = preprocess(images, headed_manifest.input)
    expected = locate_batch(headed, x, LocateConfig(), [image.shape[:2] for image in images])
    corners = lambda boxes: [[(b.x0, b.y0, b.x1, b.y1) for b in frame] for frame in boxes]  # noqa: E731
    assert corners(located.boxes) == corners(expected.boxes) and any(located.boxes)
    np.testing.assert_allclose([b.score for f in located.boxes for b in f],
                               [b.score for f in expected.boxes for b in f], rtol=0, atol=1e-4)
    assert expected.boxes != locate_batch(headed, x, LocateConfig(method="cam"),
                                          [image.shape[:2] for image in images]).boxes  # the head's, not the CAM's
    plain = Loader(cpu(backend=backend)).load(headed, headed_manifest).predict(images)
    assert plain.boxes is None
    reference = reference_probabilities(model, manifest, images)  # the head leaves the classifier alone
    np.testing.assert_allclose(located.probabilities, reference, rtol=0, atol=ATOL)
    np.testing.assert_allclose(plain.probabilities, reference, rtol=0, atol=ATOL if backend != "bf16" else 1e-2)


# -- loading: once per model ------------------------------------------------------------------------------


def test_a_load_warms_up_once_at_batch_1_and_a_full_batch_and_leaves_the_callers_model_alone(
        fused: tuple[RepNet, Manifest]) -> None:
    model, manifest = fused
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches: list[int] = []
    hook = model.register_forward_hook(lambda _module, args, _out: batches.append(len(args[0])))
    try:
        Loader(cpu(backend="torch", max_batch=8)).load(model, manifest)
    finally:
        hook.remove()
    assert batches == [1, 8]  # the runner's copy carries the hook: these are its forward passes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_with_non_finite_outputs_or_the_wrong_classes_is_refused(fused: tuple[RepNet, Manifest]) -> None:
    model, manifest = fused
    broken = type(model)(model.spec, model.num_classes, deploy=True)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.head.fc.bias.fill_(float("nan"))
    loader = Loader(cpu(backend="torch"))
    with pytest.raises(ValueError, match="non-finite"):
        loader.load(broken.eval(), manifest)
    with pytest.raises(ValueError, match="manifest names 5"):
        loader.load(model, manifest.model_copy(update={"class_names": NEU_CLASSES[:5]}))


def test_an_unfused_model_is_refused(fused: tuple[RepNet, Manifest]) -> None:
    with pytest.raises(ValueError, match="fused models"):
        Loader(cpu(backend="torch")).load(build_model(EG_REPVGG, len(NEU_CLASSES)), fused[1])


# -- choosing: once, from one list of names ------------------------------------------------------------------


def test_the_settings_type_the_cli_and_the_runners_name_the_same_backends(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INSPECTOR_BACKEND", raising=False)
    names = typing.get_args(Settings.model_fields["backend"].annotation)
    assert set(names) == set(RUNNERS) | {"auto"} and all(RUNNERS[name].name == name for name in RUNNERS)
    assert [parse(["run", "--backend", name])[1].backend for name in names] == list(names)
    with pytest.raises(ValidationError, match="Input should be 'auto', 'bf16', 'torch', 'onnxruntime' or 'compile'"):
        parse(["run", "--backend", "tensorrt"])
    monkeypatch.setenv("INSPECTOR_BACKEND", "compile")
    assert Settings().backend == "compile"


@pytest.mark.parametrize("module", ["onnxruntime", "onnx"])
def test_a_missing_onnx_runtime_is_a_clear_error_when_the_runner_is_chosen(monkeypatch: pytest.MonkeyPatch,
                                                                           module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(BackendUnavailableError, match=rf"backend 'onnxruntime' needs the Python package '{module}'"
                                                      r".*pip install .*--backend torch"):
        Loader(cpu(backend="onnxruntime"))
    Loader(cpu(backend="torch"))  # the others do not need it


def test_a_missing_onnx_runtime_makes_inspector_run_exit_2_with_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.chdir(tmp_path)  # no stray .env
    code = main(["run", "--backend", "onnxruntime", "--device", "cpu", "--bootstrap-servers", "127.0.0.1:1",
                 "--http-port", "0", "--log-level", "error"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("inspector run: error: backend 'onnxruntime' needs the Python package 'onnxruntime'")
    assert "Traceback" not in err
