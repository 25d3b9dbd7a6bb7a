"""bf16 on the CPU: chosen from the CPU's flags (faked here), forced by the setting, and accepted for a model only
when its predictions on the checkpoint's reference batch agree with fp32 — else fp32 serves, said once.
"""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog
import torch

from inspector.metrics import Metrics
from inspector.precision import MAX_PROB_DIFF, compare, reference_frames
from inspector.runners import Bf16Runner, Loader, OnnxRuntimeRunner
from inspector.settings import Settings
from schemas.checkpoint import InputSpec, Manifest
from stripnet.bundled import resolve_model_dir
from stripnet.checkpoint import load_checkpoint
from stripnet.network import RepNet
from stripnet.preprocess import preprocess, resize
from tests.helpers import NEU_CLS

MAX_BATCH = 8
WITH_BF16, WITHOUT = frozenset({"fpu", "avx512f", "avx512_bf16"}), frozenset({"fpu", "avx2", "avx512f"})


@pytest.fixture(scope="module")
def bundled() -> tuple[RepNet, Manifest]:
    return load_checkpoint(resolve_model_dir("default"))


def loader(flags: frozenset[str], metrics: Metrics | None = None, **overrides) -> Loader:
    settings = Settings(_env_file=None, **({"device": "cpu", "max_batch": MAX_BATCH} | overrides))
    return Loader(settings, metrics=metrics, flags=lambda: flags)


def backend_labels(metrics: Metrics) -> str:
    return next(line for line in metrics.render().decode().splitlines() if line.startswith("inspector_backend_info{"))


# -- choosing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "expected"), [
    (WITH_BF16, Bf16Runner),
    (frozenset({"amx_tile", "amx_bf16"}), Bf16Runner),
    (WITHOUT, OnnxRuntimeRunner),
    (frozenset(), OnnxRuntimeRunner),
])
def test_auto_serves_bf16_exactly_when_the_cpu_reports_bf16_instructions(flags: frozenset[str],
                                                                         expected: type) -> None:
    assert Settings(_env_file=None).backend == "auto"
    assert loader(flags, backend="auto").runner is expected


@pytest.mark.parametrize(("backend", "flags", "expected"), [
    ("onnxruntime", WITH_BF16, OnnxRuntimeRunner),
    ("bf16", WITHOUT, Bf16Runner),
])
def test_the_backend_setting_forces_either(backend: str, flags: frozenset[str], expected: type,
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert loader(flags, backend=backend).runner is expected
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INSPECTOR_BACKEND", backend)
    assert Loader(Settings(device="cpu"), flags=lambda: flags).runner is expected


# -- the gate ---------------------------------------------------------------------------------------------


def test_the_gate_compares_every_argmax_and_the_largest_probability_difference() -> None:
    full = np.array([[0.7, 0.3], [0.2, 0.8]])
    assert compare(full + [[-MAX_PROB_DIFF / 2, MAX_PROB_DIFF / 2], [0, 0]], full).accepted
    assert not compare(full + [[-2 * MAX_PROB_DIFF, 2 * MAX_PROB_DIFF], [0, 0]], full).accepted
    flipped = compare(np.array([[0.7, 0.3], [0.8, 0.2]]), full)
    assert (flipped.accepted, flipped.argmax_disagreements) == (False, 1)


def test_the_reference_batch_is_deterministic_gray_frames_of_the_checkpoints_size(
        bundled: tuple[RepNet, Manifest]) -> None:
    spec = bundled[1].input
    first, again = reference_frames(spec), reference_frames(spec)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert {(f.shape, f.dtype) for f in first} == {((spec.size, spec.size), np.dtype(np.uint8))}
    assert len({f.tobytes() for f in first}) == len(first)


def test_the_gate_accepts_bf16_for_the_bundled_model(bundled: tuple[RepNet, Manifest]) -> None:
    metrics = Metrics()
    with structlog.testing.capture_logs() as logs:
        runner = loader(WITH_BF16, metrics).load(*bundled)
    assert runner.name == "bf16"
    assert [e["event"] for e in logs if e["event"].startswith("bf16_")] == ["bf16_accepted"]
    assert 'gate="accepted",precision="bf16",requested="bf16",serving="bf16"' in backend_labels(metrics)


def bf16_sensitive(model: RepNet, spec: InputSpec, gain: float = 30.0) -> RepNet:
    """The model made a two-way classifier tied in fp32 on the gate's reference frames: class 0's logit less its
    median over those frames, times `gain`, against 0 for every other class. Frames near the tie sit at
    probability ½, where the features' bf16 rounding, times the gain, moves them far more than the gate allows;
    in fp32 it is a valid classifier."""
    sharp = copy.deepcopy(model).eval()
    with torch.inference_mode():
        logit = sharp(preprocess(reference_frames(spec), spec))[:, 0]
    with torch.no_grad():
        fc = sharp.head.fc
        fc.weight[1:] = 0
        fc.bias[1:] = 0
        fc.weight[0] *= gain
        fc.bias[0] = gain * (fc.bias[0] - logit.median())
    return sharp


def test_a_model_whose_bf16_predictions_differ_is_served_in_fp32_with_one_line_and_a_label(
        bundled: tuple[RepNet, Manifest]) -> None:
    metrics = Metrics()
    with structlog.testing.capture_logs() as logs:
        runner = loader(WITH_BF16, metrics).load(bf16_sensitive(bundled[0], bundled[1].input), bundled[1])
    assert (runner.name, runner.precision) == ("onnxruntime", "fp32")
    rejected = [e for e in logs if e["event"].startswith("bf16_")]
    assert [(e["event"], e["log_level"], e["serving"]) for e in rejected] == [("bf16_rejected", "warning",
                                                                               "onnxruntime")]
    assert "largest probability difference" in rejected[0]["check"]
    assert 'gate="rejected",precision="fp32",requested="bf16",serving="onnxruntime"' in backend_labels(metrics)


def test_fp32_backends_are_not_gated(bundled: tuple[RepNet, Manifest]) -> None:
    metrics = Metrics()
    assert loader(WITH_BF16, metrics, backend="onnxruntime").load(*bundled).name == "onnxruntime"
    assert 'gate="none"' in backend_labels(metrics)


def test_bf16_agrees_with_fp32_on_the_bundled_model(bundled: tuple[RepNet, Manifest]) -> None:
    """On NEU-CLS images when the dataset is present (else on the reference frames): every argmax, and every
    probability within the gate's limit."""
    model, manifest = bundled
    files = sorted(NEU_CLS.rglob("*.jpg"))[::27] if NEU_CLS.is_dir() else []
    frames = ([resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), manifest.input.size) for f in files]
              or reference_frames(manifest.input))
    bf16 = loader(WITH_BF16, backend="bf16").load(model, manifest)
    fp32 = loader(WITH_BF16, backend="onnxruntime").load(model, manifest)
    batches = [frames[i:i + MAX_BATCH] for i in range(0, len(frames), MAX_BATCH)]
    result = compare(np.concatenate([bf16.predict(b).probabilities for b in batches]),
                     np.concatenate([fp32.predict(b).probabilities for b in batches]))
    assert result.accepted, result.describe()
