"""Inference: frames → class probabilities, by one runner per backend behind one small protocol.

A runner holds one fused model ready on one device and maps a batch of uint8 frames of any size, (H, W)
gray or (H, W, 3) RGB, to probabilities (and, with `locate`, boxes in each frame's own pixels): stripnet's
preprocessing (which brings a frame to the model's colour), one forward pass, softmax. Which runner serves
is chosen once, by `Loader`, from the settings: the CUDA device runs `CudaRunner`; on the CPU `locate` runs
eager torch (the boxes need its feature map) and otherwise `Settings.backend` names the runner.
`Loader.load` is the model store's `prepare`: it builds the runner for a checkpoint's model, warms it up and
refuses a model whose outputs are not finite — once per model load. Everything here blocks: the service
calls `predict` from its inference worker threads (`Settings.inference_workers`), several at once when there
are several. The CPU runners keep no state between calls; the CUDA runner takes one call at a time (its
pinned host buffer is one per runner).

`--backend auto` (the default) serves bf16 where the CPU has bf16 dot-product instructions
(inspector/precision.py reads the flags) and ONNX Runtime fp32 elsewhere. A bf16 runner is accepted
for a model only after the accuracy gate (inspector/precision.py) on the checkpoint's reference batch
against the fp32 runner; a model that fails it is served in fp32, said in one log line
(`bf16_rejected`) and in the `inspector_backend` metric's labels.

On the CPU a gray model's gray → C-channel replication is folded into the first convolution when every
channel shares one mean and std (stripnet.network.fold_gray: exact, and one plane to normalize instead of C).
CUDA (tests/gpu, `pytest -m gpu`, and scripts/gpu-check run it on a CUDA machine): frames are
resized straight into a pinned host buffer, uploaded with non-blocking copies as uint8, normalized on
the device and run on the loader's one dedicated stream, in IEEE float32, float16 or bfloat16; only
uint8 pixels cross the bus.

Adding a backend: one class with `name`, `requires`, `__init__(model, manifest, options)` and
`predict`; its name in `inspector.settings.CpuBackend` and the class in `RUNNERS`.
"""

from __future__ import annotations

import copy
import importlib
import io
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import numpy as np
import structlog
import torch
from torch import nn

from inspector.metrics import Metrics
from inspector.precision import GateResult, gate, reference_frames
from inspector.settings import CpuBackend, DeviceName, Settings
from schemas.checkpoint import InputSpec, Manifest
from schemas.messages import Box
from stripnet.bf16 import Bf16Net, CpuFlags, cpu_flags, has_bf16
from stripnet.cam import LocateConfig, locate_batch
from stripnet.network import RepNet, can_fold_gray, fold_gray
from stripnet.ood import scored
from stripnet.preprocess import frame_pixels, normalize, pixel_shape, preprocess

Exporter = Literal["dynamo", "torchscript"]
WARM_UP_SEED = 0


class BackendUnavailableError(ValueError):
    """The selected backend's runtime is not installed."""


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # (N, classes) float32, rows sum to 1
    boxes: tuple[tuple[Box, ...], ...] | None  # per frame, in the frame's own pixels; None without locate
    ood_scores: np.ndarray | None = None  # (N,) float32 from the same pass; None when the model has no detector


class Runner(Protocol):
    name: str
    precision: str  # "fp32" or a reduced one, which the loader's accuracy gate checks

    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        """1..max_batch uint8 frames of any size, (H, W) gray or (H, W, 3) RGB → probabilities (and boxes)."""
        ...


@dataclass(frozen=True)
class RunnerOptions:
    device: torch.device
    max_batch: int
    dtype: torch.dtype = torch.float32  # CUDA only: float32, float16 or bfloat16
    # CUDA: the stream every model of one loader runs on. PyTorch keeps a cuBLAS workspace per (handle, stream)
    # for the life of the process, so a new stream per hot reload would leave one more workspace behind each time.
    stream: torch.cuda.Stream | None = None
    locate: LocateConfig | None = None  # torch runners only
    threads: int | None = None  # ONNX Runtime intra-op threads; None = torch's (set process-wide at start-up)
    fold_gray: bool = True  # benchmarks/model.py measures both
    # The TorchScript ONNX exporter: the same graph speed and outputs as the dynamo one here, but ~0.3 s
    # instead of 5-10 s to export, measured on this loaded box, paid at every start, restart and hot reload.
    exporter: Exporter = "torchscript"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)


def split_outputs(out: torch.Tensor | Sequence[torch.Tensor] | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """A served module's output, logits or (logits, unknown scores), as numpy arrays."""
    logits, *rest = (out,) if isinstance(out, torch.Tensor) else out
    arrays = [a.float().cpu().numpy() if isinstance(a, torch.Tensor) else a for a in (logits, *rest)]
    return arrays[0], (arrays[1] if rest else None)


def _numpy(scores: torch.Tensor | None) -> np.ndarray | None:
    return None if scores is None else scores.float().cpu().numpy()


def _check_batch(images: Sequence[np.ndarray], max_batch: int) -> None:
    if not 0 < len(images) <= max_batch:
        raise ValueError(f"batch of {len(images)} frames; this runner takes 1..{max_batch}")


def _served_copy(model: RepNet, spec: InputSpec, fold: bool) -> tuple[RepNet, InputSpec]:
    """A copy of the fused model in eval mode (the caller's stays untouched), gray folded in if asked and exact."""
    if not model.is_deploy:
        raise ValueError("runners serve fused models; reparameterize the model first")
    if fold and can_fold_gray(spec):
        return fold_gray(model, spec)
    return copy.deepcopy(model).eval(), spec


# -- the CPU runners ----------------------------------------------------------------------------------


class TorchRunner:
    """Eager torch on the CPU: channels-last under inference_mode; with `locate`, boxes from the same pass."""

    name: ClassVar[str] = "torch"
    precision: ClassVar[str] = "fp32"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: RepNet, manifest: Manifest, options: RunnerOptions) -> None:
        net, self.spec = _served_copy(model, manifest.input, options.fold_gray)
        self._net = net.to(memory_format=torch.channels_last)
        self._forward = self._compiled(self._net)
        self._max_batch, self._locate = options.max_batch, options.locate

    @staticmethod
    def _compiled(net: RepNet) -> Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """x → logits, or (logits, unknown scores) when the model carries a detector."""
        return scored(net, net.ood)

    def prepare(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, S, S) uint8 → the normalized input, channels-last."""
        return normalize(pixels, self.spec, channels_last=True)

    def outputs(self, x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, spec.channels, S, S) normalized float32 → (N, classes) logits and (N,) unknown scores (or None)."""
        with torch.inference_mode():
            return split_outputs(self._forward(torch.as_tensor(x).contiguous(memory_format=torch.channels_last)))

    def forward(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, spec.channels, S, S) normalized float32 → (N, classes) logits."""
        return self.outputs(x)[0]

    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        _check_batch(images, self._max_batch)
        x = preprocess(images, self.spec, channels_last=True)
        if self._locate is None:
            logits, ood_scores = self.outputs(x)
            return Prediction(softmax(logits), None, ood_scores)
        with torch.inference_mode():
            located = locate_batch(self._net, x, self._locate, [image.shape[:2] for image in images])
        return Prediction(softmax(located.logits.numpy()), located.boxes, _numpy(located.ood_scores))


class CompiledRunner(TorchRunner):
    """torch.compile'd eager torch. Batch 1 gets its own graph; every other batch size shares one dynamic one."""

    name: ClassVar[str] = "compile"

    @staticmethod
    def _compiled(net: RepNet) -> Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        return torch.compile(scored(net, net.ood))


class Bf16Runner(TorchRunner):
    """Eager torch on a CPU with bf16 instructions, channels-last: each block's convolution in bfloat16, the rest
    in fp32 (the first block's convolution and everything between convolutions: attention, activation, head).

    Chosen by measurement on the bundled model (benchmarks/model.py, and the agreement on all NEU-CLS images):
    against torch.autocast on the whole network this is both faster and closer to fp32. The one-channel first
    convolution is slower in bf16 than in fp32 (the input reorder costs more than the arithmetic saves) and
    rounding the input pixels to bf16 was most of the error; eager GELU and the attention's scaling are slower
    on bf16 tensors than on fp32 ones, and their rounding was the rest of it. The weights are cast once, by
    stripnet.bf16.Bf16Net (autocast re-casts them on every call); torch.compile of the same module was slower
    than eager."""

    name: ClassVar[str] = "bf16"
    precision: ClassVar[str] = "bf16"

    @staticmethod
    def _compiled(net: RepNet) -> Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        return scored(Bf16Net(net), net.ood)  # the unknown detector runs in fp32 (stripnet.ood.OODHead)


class OnnxRuntimeRunner:
    """The model exported to ONNX (dynamic batch axis) and run by ONNX Runtime's CPU provider."""

    name: ClassVar[str] = "onnxruntime"
    precision: ClassVar[str] = "fp32"
    requires: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnx")  # onnx: to export the graph

    def __init__(self, model: RepNet, manifest: Manifest, options: RunnerOptions) -> None:
        import onnxruntime as ort  # only this runner needs it

        net, self.spec = _served_copy(model, manifest.input, options.fold_gray)
        self.exporter, graph = export_onnx(scored(net, net.ood), self.spec, options.exporter,
                                           outputs=("logits", "ood_score") if net.ood is not None else ("logits",))
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.threads or torch.get_num_threads()
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.log_severity_level = 3
        self._session = ort.InferenceSession(graph, session_options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._max_batch = options.max_batch

    def prepare(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, S, S) uint8 → the normalized input, a contiguous NCHW float32 array."""
        return normalize(pixels, self.spec).numpy()

    def outputs(self, x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The normalized input → (N, classes) logits and (N,) unknown scores (or None), from one graph run."""
        array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        return split_outputs(self._session.run(None, {self._input: np.ascontiguousarray(array, dtype=np.float32)}))

    def forward(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]

    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        _check_batch(images, self._max_batch)
        logits, ood_scores = self.outputs(preprocess(images, self.spec).numpy())
        return Prediction(softmax(logits), None, ood_scores)


def export_onnx(model: nn.Module, spec: InputSpec, exporter: Exporter,
                outputs: tuple[str, ...] = ("logits",)) -> tuple[Exporter, bytes]:
    """ONNX bytes with a dynamic batch axis, one graph output per name in `outputs`. If the dynamo exporter
    (torch's default and future) fails, the TorchScript one is the fallback. Returns the exporter that produced
    the graph."""
    example = torch.zeros(2, spec.channels, spec.size, spec.size)  # 2: an example of 1 would fix the batch axis
    with warnings.catch_warnings():  # the exporters' notes on the graph would break JSON log lines
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            try:
                batch = torch.export.Dim("batch", min=1, max=65536)
                program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["x"],
                                            output_names=list(outputs), dynamic_shapes=({0: batch},))
                return "dynamo", program.model_proto.SerializeToString()
            except Exception as err:  # noqa: BLE001 - any exporter failure means: try the other exporter
                structlog.get_logger(__name__).warning("onnx_dynamo_export_failed", error=str(err)[:500])
        buffer = io.BytesIO()
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["x"], output_names=list(outputs),
                          dynamic_axes={name: {0: "batch"} for name in ("x", *outputs)})
    return "torchscript", buffer.getvalue()


# -- the CUDA runner ------------------------------------------------------------------------------------


class CudaRunner:
    """torch on a CUDA device: frames resized into a pinned host buffer, a non-blocking uint8 upload,
    normalization on the device, the loader's dedicated stream, IEEE float32, float16 or bfloat16; with
    `locate`, boxes from the same pass."""

    name: ClassVar[str] = "cuda"
    precision: ClassVar[str] = "fp32"  # float16/bfloat16 on CUDA are the operator's choice (--fp16), not gated
    requires: ClassVar[tuple[str, ...]] = ()
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, model: RepNet, manifest: Manifest, options: RunnerOptions) -> None:
        if options.dtype not in self.dtypes:
            raise ValueError(f"the CUDA runner runs {', '.join(map(str, self.dtypes))}, not {options.dtype}")
        if options.dtype == torch.float32:
            # cuDNN runs float32 convolutions in TF32 unless told otherwise (~1e-3 from the CPU's results).
            # Process-wide, and without effect on float16 and bfloat16 convolutions.
            torch.backends.cudnn.allow_tf32 = False
        self.spec, self.device, self.dtype = manifest.input, options.device, options.dtype
        served, _ = _served_copy(model, self.spec, fold=False)
        self._net = served.to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
        self._scored = scored(self._net, self._net.ood)
        self._max_batch, self._locate = options.max_batch, options.locate
        self.stream = options.stream if options.stream is not None else torch.cuda.Stream(self.device)
        self._host = torch.empty((options.max_batch, *pixel_shape(self.spec)), dtype=torch.uint8).pin_memory()
        self._host_pixels = self._host.numpy()  # the same pinned memory, for resizing straight into it
        self._one_call = threading.Lock()  # inference workers share the pinned buffer

    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        _check_batch(images, self._max_batch)
        n = len(images)
        pixels = [frame_pixels(image, self.spec) for image in images]
        # Safe to overwrite under the lock: the previous predict returned only after its .cpu(), which waited
        # for its upload.
        with self._one_call, torch.inference_mode(), torch.cuda.stream(self.stream):
            np.stack(pixels, out=self._host_pixels[:n])
            x = self.prepare(self._host[:n].to(self.device, non_blocking=True))
            if self._locate is None:
                logits, ood_scores = split_outputs(self._scored(x))
                return Prediction(softmax(logits), None, ood_scores)
            located = locate_batch(self._net, x, self._locate, [image.shape[:2] for image in images])
            return Prediction(softmax(located.logits.float().cpu().numpy()), located.boxes,
                              _numpy(located.ood_scores))

    # The device-side steps, asynchronous on the current stream (benchmarks/gpu.py captures them in CUDA graphs).

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, S, S) uint8 on the device → the normalized input in the runner's dtype, channels-last."""
        return normalize(pixels, self.spec, dtype=self.dtype, channels_last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalized input → (N, classes) logits on the device, in the runner's dtype."""
        return self._net(x)


RunnerClass = type[TorchRunner] | type[OnnxRuntimeRunner] | type[CudaRunner]
RUNNERS: dict[CpuBackend, RunnerClass] = {
    "bf16": Bf16Runner,
    "torch": TorchRunner,
    "onnxruntime": OnnxRuntimeRunner,
    "compile": CompiledRunner,
}
FP32_FALLBACK: CpuBackend = "onnxruntime"  # what serves where bf16 is not available or not accepted


def auto_backend(flags: frozenset[str]) -> CpuBackend:
    """`--backend auto`: bf16 where the CPU has bf16 instructions, else fp32 ONNX Runtime."""
    return "bf16" if has_bf16(flags) else FP32_FALLBACK


# -- choosing once, loading per model ---------------------------------------------------------------------


def resolve_device(name: DeviceName) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use auto or cpu)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_available(runner: RunnerClass) -> None:
    """Fail at start-up, with the remedy, when the runner's runtime cannot be imported."""
    for module in runner.requires:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise BackendUnavailableError(
                f"backend {runner.name!r} needs the Python package {module!r}, which cannot be imported ({err}); "
                f"install it (pip install {module}) or choose --backend torch") from None


def warm_up(runner: Runner, spec: InputSpec, max_batch: int) -> None:
    """Batch 1 and a full batch (the shapes torch.compile and ONNX Runtime specialize on; other sizes reuse
    them) through the whole predict path; ValueError if an output is not finite."""
    rng = np.random.default_rng(WARM_UP_SEED)
    for batch in sorted({1, max_batch}):
        frames = list(rng.integers(0, 256, (batch, spec.size, spec.size), dtype=np.uint8))
        if not np.isfinite(runner.predict(frames).probabilities).all():
            raise ValueError(f"{runner.name} runner gives non-finite outputs at batch size {batch}")


class Loader:
    """The runner chosen once from the settings; `load` makes it ready for one model (the model store's
    `prepare`). Raises BackendUnavailableError at start-up when the chosen backend is not installed.
    `flags` gives the CPU's feature flags (tests fake them); `metrics` hears which backend each load serves."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, flags: CpuFlags = cpu_flags) -> None:
        device = resolve_device(settings.device)
        locate = LocateConfig() if settings.locate else None
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.options = RunnerOptions(device, settings.max_batch, locate=locate, threads=settings.threads,
                                     dtype=torch.float16 if settings.fp16 else torch.float32, stream=stream)
        self.requested: CpuBackend = auto_backend(flags()) if settings.backend == "auto" else settings.backend
        self.runner: RunnerClass = self._choose(self.requested, device, locate)
        check_available(self.runner)
        self.fallback = _installed_or_torch(RUNNERS[FP32_FALLBACK])  # the fp32 reference and fallback of the gate
        self._metrics = metrics
        self._log = structlog.get_logger(__name__)

    @staticmethod
    def _choose(backend: CpuBackend, device: torch.device, locate: LocateConfig | None) -> RunnerClass:
        chosen = CudaRunner if device.type == "cuda" else TorchRunner if locate is not None else RUNNERS[backend]
        if chosen is not RUNNERS[backend]:
            structlog.get_logger(__name__).info(
                "backend_not_used", requested=backend, serving=chosen.name,
                reason=f"the {device.type} device runs torch" if device.type == "cuda"
                else "--locate needs the torch module's feature map")
        return chosen

    def load(self, model: RepNet, manifest: Manifest) -> Runner:
        """A warmed-up runner for `model`; ValueError if it does not fit its manifest or gives non-finite outputs."""
        if model.num_classes != len(manifest.class_names):
            raise ValueError(f"model has {model.num_classes} outputs, manifest names {len(manifest.class_names)}")
        runner: Runner = self.runner(model, manifest, self.options)
        verdict = None
        if runner.precision != "fp32":
            runner, verdict = self._gated(runner, model, manifest)
        warm_up(runner, manifest.input, self.options.max_batch)
        if self._metrics is not None:
            self._metrics.backend_serving(requested=self.requested, serving=runner.name, precision=runner.precision,
                                          gate="none" if verdict is None else
                                          "accepted" if verdict.accepted else "rejected")
        return runner

    def _gated(self, reduced: Runner, model: RepNet, manifest: Manifest) -> tuple[Runner, GateResult]:
        """The accuracy gate: `reduced` if it agrees with fp32 on the reference batch, else the fp32 fallback. The
        fp32 side is eager torch (the fallback's outputs to ~1e-6, without its ONNX export on every load)."""
        full = TorchRunner(model, manifest, self.options)
        verdict = gate(lambda b: reduced.predict(b).probabilities, lambda b: full.predict(b).probabilities,
                       reference_frames(manifest.input), self.options.max_batch)
        if verdict.accepted:
            self._log.info("bf16_accepted", version=manifest.model_version, check=verdict.describe())
            return reduced, verdict
        fallback: Runner = self.fallback(model, manifest, self.options)
        self._log.warning("bf16_rejected", version=manifest.model_version, serving=fallback.name,
                          check=verdict.describe())
        return fallback, verdict


def _installed_or_torch(runner: RunnerClass) -> RunnerClass:
    try:
        check_available(runner)
    except BackendUnavailableError:
        return TorchRunner
    return runner
