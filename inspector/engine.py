"""Inference: a fused model made ready for one device, and gray frames → class probabilities.

`Engine.prepare` is the model store's `prepare`: it moves a checkpoint's model to the device,
warms it up at every batch size the service will use (1..max_batch) and refuses a model whose
outputs are not finite. `Runner.predict` does the manifest's preprocessing — resize to the input
size (as stripnet.preprocess.resize does), replicate gray to the input channels, normalize — and one
forward pass. Both block: the service calls `predict` on its single inference thread.

CPU: the forward pass runs on the selected backend (inspector/backends.py: eager torch, ONNX
Runtime or torch.compile), with the gray → C-channel replication folded into the first convolution
when every channel shares one mean and std (exact; one channel to normalize instead of C). With
`locate` the torch module runs instead, because the boxes need its feature map. CUDA (not exercised
by the tests; no GPU here): torch; frames are copied into a pinned host buffer, uploaded with
non-blocking copies and run on a dedicated stream, optionally in fp16; only uint8 pixels cross the
bus, normalization runs on the device.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import structlog
import torch

from inspector.backends import Backend, BackendName, make_backend
from schemas.checkpoint import InputSpec, Manifest
from schemas.messages import Box
from stripnet.cam import LocateConfig, locate_batch
from stripnet.network import RepNet

DeviceName = Literal["auto", "cpu", "cuda"]
# Modules a backend imports beyond torch: ONNX Runtime runs the graph, `onnx` is needed to export it.
BACKEND_MODULES: dict[str, tuple[str, ...]] = {"torch": (), "compile": (), "onnxruntime": ("onnxruntime", "onnx")}


class BackendUnavailableError(ValueError):
    """The selected backend's runtime is not installed."""


def check_backend(name: BackendName) -> None:
    """Fail at start-up, with the remedy, when the backend's runtime cannot be imported."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_MODULES)}")
    for module in BACKEND_MODULES[name]:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise BackendUnavailableError(
                f"backend {name!r} needs the Python package {module!r}, which cannot be imported ({err}); "
                f"install it (pip install {module}) or choose --backend torch") from None


def resolve_device(name: DeviceName) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use auto or cpu)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_threads(threads: int | None) -> None:
    """Intra-op threads for CPU inference (process-wide; call once at start-up). None keeps torch's default."""
    if threads is not None:
        torch.set_num_threads(threads)


def resize_gray(image: np.ndarray, size: int) -> np.ndarray:
    """The training-time resize: area when shrinking, bilinear when enlarging."""
    if image.shape == (size, size):
        return image
    interp = cv2.INTER_AREA if min(image.shape) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # (N, classes) float32, rows sum to 1
    boxes: tuple[tuple[Box, ...], ...] | None  # per frame, in the frame's own pixels; None without --locate


class Runner:
    """One model on one device, ready to predict. Create it through `Engine.prepare`."""

    def __init__(self, model: RepNet, manifest: Manifest, device: torch.device, *, max_batch: int,
                 fp16: bool = False, locate: LocateConfig | None = None, backend: BackendName = "torch") -> None:
        self.manifest, self.device, self.max_batch = manifest, device, max_batch
        self._spec: InputSpec = manifest.input
        self._locate = locate
        self._cuda = device.type == "cuda"
        self._backend: Backend | None = None
        if not self._cuda and locate is None:
            # The TorchScript ONNX exporter: same graph speed and outputs as the dynamo one here, but ~0.3 s
            # instead of 5-10 s measured on this loaded box, paid at every start, restart and hot reload.
            with warnings.catch_warnings():  # the exporter's notes on the graph would break JSON log lines
                warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
                self._backend = make_backend(backend, model, manifest, (1, max_batch), fold_gray=_foldable(manifest),
                                             exporter="torchscript")
            self._scale, self._offset = _affine(manifest, self._backend.in_channels)
            return
        self._dtype = torch.float16 if fp16 and self._cuda else torch.float32
        self._model = model.eval().to(device=device, dtype=self._dtype, memory_format=torch.channels_last)
        norm = self._spec.normalization
        self._mean = torch.tensor(norm.mean, device=device, dtype=self._dtype).view(1, -1, 1, 1)
        self._std = torch.tensor(norm.std, device=device, dtype=self._dtype).view(1, -1, 1, 1)
        if self._cuda:
            self._stream = torch.cuda.Stream(device)
            self._host = torch.empty((max_batch, self._spec.size, self._spec.size), dtype=torch.uint8).pin_memory()

    @property
    def backend(self) -> str:
        """What runs the forward pass: the backend's name, or "torch" (CUDA, --locate)."""
        return self._backend.name if self._backend is not None else "torch"

    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        """(H, W) uint8 gray frames of any size (at most max_batch of them) → probabilities (and boxes)."""
        if not 0 < len(images) <= self.max_batch:
            raise ValueError(f"batch of {len(images)} frames; this runner takes 1..{self.max_batch}")
        pixels = np.stack([resize_gray(image, self._spec.size) for image in images])
        if self._backend is not None:
            return Prediction(softmax(self._backend(self._normalize_array(pixels))), None)
        with torch.inference_mode():
            if self._cuda:
                with torch.cuda.stream(self._stream):
                    return self._forward(self._upload(pixels), images)
            return self._forward(torch.from_numpy(pixels), images)

    def _normalize_array(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 → (N, C, S, S) float32, gray replicated to the backend's C, (x/255 - mean) / std."""
        x = np.empty((len(pixels), self._scale.shape[1], *pixels.shape[1:]), dtype=np.float32)
        x[:] = pixels[:, None]
        x *= self._scale
        x += self._offset
        return x

    def _upload(self, pixels: np.ndarray) -> torch.Tensor:
        host = self._host[: len(pixels)]
        host.copy_(torch.from_numpy(pixels))
        return host.to(self.device, non_blocking=True)

    def _forward(self, pixels: torch.Tensor, images: Sequence[np.ndarray]) -> Prediction:
        x = self._normalize(pixels)
        boxes = None
        if self._locate is not None:
            located = locate_batch(self._model, x, self._locate, [image.shape[:2] for image in images])
            logits, boxes = located.logits, located.boxes
        else:
            logits = self._model(x)
        probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return Prediction(probabilities, boxes)

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, S, S) uint8 → (N, C, S, S) channels-last, gray replicated to C, (x/255 - mean) / std."""
        x = pixels.to(self._dtype).div_(255.0).unsqueeze(1).expand(-1, self._spec.channels, -1, -1)
        return ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)


def _foldable(manifest: Manifest) -> bool:
    """Gray replicated to C > 1 channels that share one mean and std: the first conv can take one channel."""
    norm = manifest.input.normalization
    return manifest.input.channels > 1 and len(set(norm.mean)) == 1 and len(set(norm.std)) == 1


def _affine(manifest: Manifest, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(x/255 - mean) / std as x * scale + offset, per channel, shaped (1, C, 1, 1)."""
    norm = manifest.input.normalization
    mean, std = np.asarray(norm.mean[:channels], np.float64), np.asarray(norm.std[:channels], np.float64)
    shape = (1, channels, 1, 1)
    return (1.0 / (255.0 * std)).astype(np.float32).reshape(shape), (-mean / std).astype(np.float32).reshape(shape)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)


class Engine:
    """Makes runners for one device, batch-size range and backend; `prepare` is the model store's callback.

    `backend` selects the CPU runtime (eager torch unless told; `inspector run` passes Settings.backend). It is
    checked here, at start-up: a backend whose runtime is not installed raises BackendUnavailableError."""

    def __init__(self, device: DeviceName = "auto", *, max_batch: int = 32, fp16: bool = False,
                 locate: LocateConfig | None = None, backend: BackendName = "torch") -> None:
        self.device = resolve_device(device)
        self.max_batch, self.fp16, self.locate = max_batch, fp16, locate
        self.requested_backend: BackendName = backend
        self.backend: BackendName = backend if self.device.type == "cpu" and locate is None else "torch"
        if self.backend != backend:
            structlog.get_logger(__name__).info(
                "backend_not_used", requested=backend, serving="torch",
                reason="--locate needs the torch module's feature map" if locate is not None
                else f"the {self.device.type} device runs torch")
        check_backend(self.backend)

    def prepare(self, model: RepNet, manifest: Manifest) -> Runner:
        """Device-ready, warmed-up runner; ValueError if any warm-up output is not finite."""
        if model.num_classes != len(manifest.class_names):
            raise ValueError(f"model has {model.num_classes} outputs, manifest names {len(manifest.class_names)}")
        runner = Runner(model, manifest, self.device, max_batch=self.max_batch, fp16=self.fp16, locate=self.locate,
                        backend=self.backend)
        rng = np.random.default_rng(0)
        size = manifest.input.size
        for batch in range(1, self.max_batch + 1):
            frames = list(rng.integers(0, 256, (batch, size, size), dtype=np.uint8))
            probabilities = runner.predict(frames).probabilities
            if not np.isfinite(probabilities).all():
                raise ValueError(f"model {manifest.model_version} gives non-finite outputs at batch size {batch}")
        return runner
