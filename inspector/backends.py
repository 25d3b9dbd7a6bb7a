"""Selectable CPU inference backends for a fused model: eager torch, ONNX Runtime, torch.compile.

Every backend maps float32 NCHW input, already normalized, to float32 logits `(N, classes)`, and
computes the same function as eager torch (tests/inspector/test_backends.py holds them to 1e-4).
`backend.prepare(pixels)` turns (N, S, S) uint8 gray frames into that input, in the layout the
backend runs fastest on (channels-last tensor for torch, contiguous NCHW array for ONNX Runtime).
`make_backend` warms each one up at the given batch sizes, so the first real call is not the one
that pays for compilation or allocation. Calls block and may run on any single worker thread.

`fold_gray=True` folds the gray → C-channel replication into the first convolution (its weights
summed over input channels): the backend then takes one channel, `in_channels == 1`, normalized
with the manifest's (shared) mean and std. This is exact because a convolution is linear in its
input and every replicated channel, zero padding included, holds the same values.

Measured side by side in benchmarks/model.py (`make bench`); see benchmarks/results/README.md.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import numpy as np
import structlog
import torch
from torch import nn

from schemas.checkpoint import Manifest, Normalization
from stripnet.network import RepNet

BackendName = Literal["torch", "onnxruntime", "compile"]
BACKEND_NAMES: tuple[BackendName, ...] = ("torch", "onnxruntime", "compile")
Exporter = Literal["dynamo", "torchscript"]
ArrayLike = np.ndarray | torch.Tensor


class Backend(Protocol):
    name: str
    in_channels: int  # channels the backend takes: the manifest's, or 1 with fold_gray

    def prepare(self, pixels: ArrayLike) -> ArrayLike:
        """(N, S, S) uint8 gray → this backend's normalized input, in its preferred layout."""
        ...

    def __call__(self, x: ArrayLike) -> np.ndarray:
        """(N, in_channels, S, S) float32, normalized → (N, classes) float32 logits."""
        ...


def make_backend(
    name: BackendName, model: RepNet, manifest: Manifest, batch_sizes: Sequence[int] = (1,), *,
    fold_gray: bool = False, threads: int | None = None, exporter: Exporter = "dynamo",
) -> Backend:
    """A warmed-up backend for the fused `model`. `threads` sets ONNX Runtime's intra-op threads
    (default: torch.get_num_threads(), so both runtimes use the same settings); torch's own thread
    count is process-wide and left to the caller (inspector.engine.configure_threads)."""
    if not model.is_deploy:
        raise ValueError("backends serve fused models; reparameterize the model first")
    net = fold_gray_input(model, manifest) if fold_gray else copy.deepcopy(model).eval()
    channels = 1 if fold_gray else manifest.input.channels
    shape = (channels, manifest.input.size, manifest.input.size)
    norm = manifest.input.normalization
    match name:
        case "torch":
            backend: Backend = TorchBackend(net, shape, norm)
        case "compile":
            backend = TorchBackend(net, shape, norm, compiled=True)
        case "onnxruntime":
            backend = OnnxRuntimeBackend(net, shape, norm, threads=threads or torch.get_num_threads(),
                                         exporter=exporter)
        case _:
            raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    warm_up(backend, shape, batch_sizes)
    return backend


def warm_up(backend: Backend, shape: tuple[int, int, int], batch_sizes: Sequence[int]) -> None:
    for batch in sorted(set(batch_sizes)):
        logits = backend(np.zeros((batch, *shape), dtype=np.float32))
        if not np.isfinite(logits).all():
            raise ValueError(f"{backend.name} backend gives non-finite logits at batch size {batch}")


def fold_gray_input(model: RepNet, manifest: Manifest) -> RepNet:
    """A copy of the fused `model` that takes one gray channel instead of C identical ones."""
    norm = manifest.input.normalization
    if len(set(norm.mean)) != 1 or len(set(norm.std)) != 1:
        raise ValueError("fold_gray needs the same mean and std on every input channel; "
                         f"the manifest has mean={norm.mean} std={norm.std}")
    folded = copy.deepcopy(model).eval()
    first = folded.blocks[0].reparam_conv
    if first is None or first.groups != 1 or first.in_channels != manifest.input.channels:
        raise ValueError("fold_gray needs a fused model whose first convolution takes the manifest's channels")
    conv = nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride, first.padding,  # type: ignore[arg-type]
                     first.dilation, bias=first.bias is not None)  # type: ignore[arg-type]
    with torch.no_grad():
        conv.weight.copy_(first.weight.sum(dim=1, keepdim=True))
        if first.bias is not None:
            conv.bias.copy_(first.bias)  # type: ignore[union-attr]
    folded.blocks[0].reparam_conv = conv
    return folded


def normalize_gray(pixels: ArrayLike, norm: Normalization, channels: int, *, channels_last: bool) -> torch.Tensor:
    """(N, S, S) uint8 → (N, channels, S, S) float32, (x/255 − mean) / std, as stripnet.preprocess.normalize.

    With one mean/std for all channels it normalizes the single gray plane before replicating it,
    so the arithmetic runs on 1/C of the data; with one channel the layouts coincide (no copy)."""
    x = torch.as_tensor(pixels).to(torch.float32).div_(255.0).unsqueeze(1)
    if len(set(norm.mean)) == 1 and len(set(norm.std)) == 1:
        x = x.sub_(norm.mean[0]).div_(norm.std[0]).expand(-1, channels, -1, -1)
    else:
        x = (x - torch.tensor(norm.mean).view(1, -1, 1, 1)) / torch.tensor(norm.std).view(1, -1, 1, 1)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _check_shape(x: ArrayLike, shape: tuple[int, int, int], backend: str) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != shape or x.shape[0] < 1:
        raise ValueError(f"{backend} backend takes (N, {', '.join(map(str, shape))}) input, got {tuple(x.shape)}")


class TorchBackend:
    """Eager (or torch.compile'd) channels-last inference under torch.inference_mode."""

    def __init__(self, model: nn.Module, shape: tuple[int, int, int], norm: Normalization, *,
                 compiled: bool = False) -> None:
        self.name = "compile" if compiled else "torch"
        self.in_channels, self._shape, self._norm = shape[0], shape, norm
        model = model.eval().to(memory_format=torch.channels_last)
        # Batch 1 is specialized by torch.compile; every other batch size shares one dynamic graph.
        self._forward: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if compiled else model

    def prepare(self, pixels: ArrayLike) -> torch.Tensor:
        return normalize_gray(pixels, self._norm, self.in_channels, channels_last=True)

    def __call__(self, x: ArrayLike) -> np.ndarray:
        _check_shape(x, self._shape, self.name)
        t = torch.as_tensor(x, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self._forward(t).numpy()


class OnnxRuntimeBackend:
    """The model exported to ONNX (dynamic batch axis) and run by ONNX Runtime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, model: nn.Module, shape: tuple[int, int, int], norm: Normalization, *, threads: int,
                 exporter: Exporter) -> None:
        import onnxruntime as ort  # imported here: only this backend needs it

        self.in_channels, self._shape, self._norm = shape[0], shape, norm
        self.exporter, onnx_bytes = export_onnx(model, shape, exporter)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def prepare(self, pixels: ArrayLike) -> np.ndarray:
        return normalize_gray(pixels, self._norm, self.in_channels, channels_last=False).numpy()

    def __call__(self, x: ArrayLike) -> np.ndarray:
        _check_shape(x, self._shape, self.name)
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        array = np.ascontiguousarray(x, dtype=np.float32)
        return self._session.run(None, {self._input: array})[0]


def export_onnx(model: nn.Module, shape: tuple[int, int, int], exporter: Exporter) -> tuple[Exporter, bytes]:
    """ONNX bytes with a dynamic batch axis. The dynamo exporter is torch's default and future; if it
    fails, the TorchScript exporter (deprecated, but 10× faster to export) is the fallback."""
    example = torch.zeros(2, *shape)  # batch 2: an example of 1 would let export specialize the axis
    if exporter == "dynamo":
        try:
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["x"],
                                        output_names=["logits"], dynamic_shapes=({0: batch},))
            return "dynamo", program.model_proto.SerializeToString()
        except Exception as err:  # noqa: BLE001 - any exporter failure means: try the other exporter
            structlog.get_logger(__name__).warning("onnx_dynamo_export_failed", error=str(err)[:500])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return "torchscript", buffer.getvalue()
