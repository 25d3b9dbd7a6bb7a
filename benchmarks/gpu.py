"""GPU benchmark: the fused student on one CUDA device, fp32 / fp16 / bf16, eager / CUDA graph / torch.compile,
batch 1 to 256, beside the paper's figure (KD-EG-RepVGG on an RTX 3060: 2.4 ms, 408 FPS). Skipped without CUDA.

Modes, each for every precision and batch size:
  * service path — `CudaRunner.predict` on host uint8 frames: resize into the pinned buffer, upload, normalize
    and forward on the runner's stream, softmax on the host. What a batch costs the inspector's inference thread.
  * service path, CUDA graph — the same with the device-side steps (`prepare` + `forward`) captured once per
    batch size and replayed: what the runner would cost if it replayed graphs instead of launching kernels.
  * device: eager / CUDA graph / torch.compile — the device-side steps alone on a uint8 batch already uploaded:
    the model's ceiling on this device. torch.compile only for the precisions in `Plan.compile` (its compile
    time, paid at every start and hot reload, is reported).
Per cell: latency = wall time of one call followed by a synchronize (p50, p99); throughput = batch × calls /
the time of back-to-back calls between two CUDA events (the host queues work ahead, as a pipelined server
would). Upload = one pinned uint8 batch host → device alone. Agreement = labels of fp16 and bf16 against fp32
on the reference frames (NEU-CLS at $NEU_CLS_DIR or next to the repository, else random frames).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from pydantic import BaseModel

from benchmarks import BenchOptions, Section, markdown_table, percentile_ms
from benchmarks.loadgen import NEU_CLS
from inspector.runners import CudaRunner, RunnerOptions, softmax
from stripnet.bundled import resolve_model_dir
from stripnet.checkpoint import load_checkpoint
from stripnet.preprocess import frame_pixels, pixel_shape

PAPER = {"device": "RTX 3060", "latency_ms": 2.4, "images_per_s": 408.0}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SERVICE, SERVICE_GRAPH = "service path", "service path, CUDA graph"
EAGER, GRAPH, COMPILE = "device: eager", "device: CUDA graph", "device: torch.compile"
MODES = (SERVICE, SERVICE_GRAPH, EAGER, GRAPH, COMPILE)
SERVICE_BATCH = 32  # the inspector's default max_batch


def unavailable() -> str | None:
    """Why this benchmark cannot run here (benchmarks.run skips it and keeps results/gpu.json), or None."""
    return None if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available() is False)"


@dataclass(frozen=True)
class Plan:
    batch_sizes: tuple[int, ...]
    cell_s: float  # per cell, half for the latency loop and half for the throughput loop
    compile: tuple[str, ...]  # precisions also measured with torch.compile
    budget_s: float  # cells not reached by then are left out, and counted

    @staticmethod
    def for_options(options: BenchOptions) -> Plan:
        if options.quick:
            return Plan(batch_sizes=(1, 32, 256), cell_s=0.1, compile=(), budget_s=40)
        return Plan(batch_sizes=(1, 4, 16, 32, 64, 128, 256), cell_s=0.4, compile=("fp16",), budget_s=130)


class Cell(BaseModel):
    precision: str
    mode: str
    batch: int
    calls: int
    p50_ms: float
    p99_ms: float
    images_per_s: float


class Failure(BaseModel):
    precision: str
    mode: str
    error: str


class Upload(BaseModel):
    batch: int
    ms: float
    gb_per_s: float


class Agreement(BaseModel):
    precision: str
    frames: int
    same_label: int
    max_probability_diff: float


class GpuReport(BaseModel):
    device: str
    capability: str
    cuda: str | None
    cudnn: int | None
    model: str
    frames: str
    batch_sizes: list[int]
    cell_s: float
    cells: list[Cell]
    failures: list[Failure]
    left_out: int  # cells not measured within the budget
    compile_s: dict[str, float]  # precision → seconds of its first calls (compilation)
    uploads: list[Upload]
    agreement: list[Agreement]
    paper: dict[str, str | float]

    def cell(self, precision: str, mode: str, batch: int) -> Cell | None:
        return next((c for c in self.cells if (c.precision, c.mode, c.batch) == (precision, mode, batch)), None)


def log(message: str) -> None:
    print(f"[bench gpu] {message}", file=sys.stderr, flush=True)


# --- inputs and timing ------------------------------------------------------------------------------------


def reference_frames(size: int, count: int = 256) -> tuple[list[np.ndarray], str]:
    root = Path(os.environ.get("NEU_CLS_DIR", NEU_CLS))
    paths = sorted(root.rglob("*.jpg")) if root.is_dir() else []
    if paths:
        return ([cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_GRAYSCALE) for p in paths],
                f"{len(paths)} NEU-CLS images")
    rng = np.random.default_rng(0)
    return list(rng.integers(0, 256, (count, size, size), dtype=np.uint8)), f"{count} random frames (no NEU-CLS)"


def time_cell(fn: Callable[[], object], batch: int, seconds: float) -> tuple[int, float, float, float]:
    """(calls, p50 ms, p99 ms, images/s) of `fn`, on the current stream (see the module docstring)."""
    fn()
    torch.cuda.synchronize()
    walls: list[float] = []
    end = time.perf_counter() + seconds / 2
    while len(walls) < 5 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    n = max(5, int(seconds / 2 / max(float(np.median(walls)), 1e-6)))
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    stop.record()
    stop.synchronize()
    return (len(walls) + n, round(percentile_ms(walls, 50), 3), round(percentile_ms(walls, 99), 3),
            round(batch * n / (start.elapsed_time(stop) / 1e3), 1))


def capture(fn: Callable[[], torch.Tensor], stream: torch.cuda.Stream) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`fn` captured in a CUDA graph on `stream` (after warm-up calls there), and its output tensor."""
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph, out


class GraphedServicePath:
    """CudaRunner.predict's host steps around one replayed graph of its device steps, for one batch size."""

    def __init__(self, runner: CudaRunner, batch: int) -> None:
        shape = (batch, *pixel_shape(runner.spec))
        self._runner = runner
        self._host = torch.empty(shape, dtype=torch.uint8).pin_memory()
        self._pixels = torch.empty(shape, dtype=torch.uint8, device=runner.device)
        self.graph, self._logits = capture(lambda: runner.forward(runner.prepare(self._pixels)), runner.stream)

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        np.stack([frame_pixels(image, self._runner.spec) for image in images], out=self._host.numpy())
        with torch.cuda.stream(self._runner.stream):
            self._pixels.copy_(self._host, non_blocking=True)
            self.graph.replay()
            return softmax(self._logits.float().cpu().numpy())


# --- measuring --------------------------------------------------------------------------------------------


@dataclass
class Bench:
    plan: Plan
    frames: list[np.ndarray]
    deadline: float
    cells: list[Cell]
    failures: list[Failure]
    left_out: int = 0

    def batch(self, n: int) -> list[np.ndarray]:
        return (self.frames * (n // len(self.frames) + 1))[:n]

    def run(self, precision: str, mode: str, batch: int, fn: Callable[[], object]) -> None:
        if time.perf_counter() > self.deadline:
            self.left_out += 1
            return
        try:
            calls, p50, p99, ips = time_cell(fn, batch, self.plan.cell_s)
        except Exception as err:  # noqa: BLE001 - a mode that fails on this device is reported, not fatal
            self.failures.append(Failure(precision=precision, mode=mode, error=f"{type(err).__name__}: {err}"[:300]))
            return
        self.cells.append(Cell(precision=precision, mode=mode, batch=batch, calls=calls, p50_ms=p50, p99_ms=p99,
                               images_per_s=ips))

    def precision(self, name: str, runner: CudaRunner) -> None:
        """Every mode of one precision but torch.compile (`compiled`, measured last: it takes the longest)."""
        for b in self.plan.batch_sizes:
            images = self.batch(b)
            pixels = torch.from_numpy(np.stack([frame_pixels(im, runner.spec) for im in images])).to(runner.device)
            self.run(name, SERVICE, b, lambda: runner.predict(images))
            self.run(name, EAGER, b, lambda: runner.forward(runner.prepare(pixels)))
            if time.perf_counter() > self.deadline:
                self.left_out += 2
                continue
            try:
                graphed = GraphedServicePath(runner, b)
            except Exception as err:  # noqa: BLE001 - capture can fail on some stacks; reported
                self.failures.append(Failure(precision=name, mode=GRAPH, error=f"{type(err).__name__}: {err}"[:300]))
                continue
            self.run(name, GRAPH, b, graphed.graph.replay)
            self.run(name, SERVICE_GRAPH, b, lambda: graphed(images))
            del graphed

    def compiled(self, name: str, runner: CudaRunner) -> float | None:
        """torch.compile of the device-side steps at every batch size; the seconds its first calls took."""
        if time.perf_counter() > self.deadline:
            self.left_out += len(self.plan.batch_sizes)
            return None
        step = torch.compile(lambda p: runner.forward(runner.prepare(p)))
        compile_s = 0.0
        for b in self.plan.batch_sizes:
            pixels = torch.zeros((b, *pixel_shape(runner.spec)), dtype=torch.uint8, device=runner.device)
            t0 = time.perf_counter()
            try:
                step(pixels)
                torch.cuda.synchronize()
            except Exception as err:  # noqa: BLE001 - inductor can fail on some stacks; reported
                self.failures.append(Failure(precision=name, mode=COMPILE, error=f"{type(err).__name__}: {err}"[:300]))
                return None
            compile_s += time.perf_counter() - t0
            self.run(name, COMPILE, b, lambda: step(pixels))
        return round(compile_s, 1)


def uploads(runner: CudaRunner, batch_sizes: tuple[int, ...]) -> list[Upload]:
    out = []
    for b in batch_sizes:
        host = torch.zeros((b, *pixel_shape(runner.spec)), dtype=torch.uint8).pin_memory()
        device = torch.empty_like(host, device=runner.device)
        with torch.cuda.stream(runner.stream):
            device.copy_(host, non_blocking=True)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                device.copy_(host, non_blocking=True)
            stop.record()
            stop.synchronize()
        ms = start.elapsed_time(stop) / 20
        out.append(Upload(batch=b, ms=round(ms, 4), gb_per_s=round(host.numel() / ms / 1e6, 1)))
    return out


def agreement(runners: dict[str, CudaRunner], frames: list[np.ndarray], batch: int) -> list[Agreement]:
    def predict(runner: CudaRunner) -> np.ndarray:
        return np.concatenate([runner.predict(frames[i:i + batch]).probabilities for i in range(0, len(frames), batch)])

    reference = predict(runners["fp32"])
    out = []
    for name in [n for n in ("fp16", "bf16") if n in runners]:
        got = predict(runners[name])
        out.append(Agreement(precision=name, frames=len(frames),
                             same_label=int((got.argmax(1) == reference.argmax(1)).sum()),
                             max_probability_diff=round(float(np.abs(got - reference).max()), 5)))
    return out


# --- markdown ---------------------------------------------------------------------------------------------


def _rows(report: GpuReport, value: Callable[[Cell], str]) -> list[list[str]]:
    rows = []
    for precision in PRECISIONS:
        for mode in MODES:
            cells = [report.cell(precision, mode, b) for b in report.batch_sizes]
            if any(cells):
                rows.append([precision, mode, *["–" if c is None else value(c) for c in cells]])
    return rows


def _best(report: GpuReport, batch: int, modes: tuple[str, ...]) -> Cell | None:
    cells = [c for c in report.cells if c.batch == batch and c.mode in modes]
    return max(cells, key=lambda c: c.images_per_s, default=None)


def render(report: GpuReport) -> str:
    header = ["Precision", "Mode", *[f"@{b}" for b in report.batch_sizes]]
    align = "ll" + "r" * len(report.batch_sizes)
    parts = [
        f"{report.device} (compute capability {report.capability}), CUDA {report.cuda}, cuDNN {report.cudnn}. "
        f"Model: {report.model}. Service-path frames: {report.frames}. Latency = one call then a synchronize; "
        f"throughput = back-to-back calls between CUDA events; ≈ {report.cell_s:g} s per cell. "
        "*Service path* is `CudaRunner.predict` (host frames in, probabilities out); *device* rows are the "
        "device-side steps alone on an uploaded uint8 batch. fp32 is IEEE (TF32 convolutions off)."
        + (f" {report.left_out} cells were left out: the time budget ran out." if report.left_out else ""),
        "Throughput, images/s:",
        markdown_table(header, _rows(report, lambda c: f"{c.images_per_s:,.0f}"), align),
        "Latency per call, p50 / p99 ms:",
        markdown_table(header, _rows(report, lambda c: f"{c.p50_ms:.2f} / {c.p99_ms:.2f}"), align),
    ]
    one = [["paper: KD-EG-RepVGG, " + str(report.paper["device"]), f"{report.paper['latency_ms']:.1f} ms",
            f"{report.paper['images_per_s']:,.0f}"]]
    for label, modes in (("this device, service path", (SERVICE, SERVICE_GRAPH)),
                         ("this device, device-side only", (EAGER, GRAPH, COMPILE))):
        best = _best(report, 1, modes)
        if best is not None:
            one.append([f"{label} (best: {best.precision}, {best.mode})", f"{best.p50_ms:.2f} ms",
                        f"{best.images_per_s:,.0f}"])
    parts += ["Batch 1 beside the paper:", markdown_table(["At batch 1", "Latency", "Images/s"], one)]
    choice = []
    for b in report.batch_sizes:
        base, best = report.cell("fp32", SERVICE, b), _best(report, b, (SERVICE, SERVICE_GRAPH))
        if base is not None and best is not None:
            choice.append([str(b), f"{base.images_per_s:,.0f}", f"{best.precision}, {best.mode}",
                           f"{best.images_per_s:,.0f}", f"{best.images_per_s / base.images_per_s:.2f}×"])
    if choice:
        parts += [f"What to serve with, by measurement (the service's default max_batch is {SERVICE_BATCH}):",
                  markdown_table(["Batch", "fp32 service path img/s", "Fastest service path", "img/s", "vs fp32"],
                                 choice, "rrlrr")]
    if report.uploads:
        def share(u: Upload) -> str:
            base = report.cell("fp32", SERVICE, u.batch)
            return "–" if base is None else f"{u.ms / base.p50_ms:.0%}"

        parts += ["Upload of one pinned uint8 batch alone, and its share of the fp32 service path's latency at that "
                  "batch (at most what overlapping uploads with compute could save):",
                  markdown_table(["Batch", "ms", "GB/s", "Share"],
                                 [[str(u.batch), f"{u.ms:.3f}", f"{u.gb_per_s:.1f}", share(u)] for u in report.uploads])]
    if report.agreement:
        parts.append(markdown_table(["Against fp32 (service path)", "Frames", "Same label", "Largest Δ probability"],
                                    [[a.precision, str(a.frames), str(a.same_label), f"{a.max_probability_diff:.4f}"]
                                     for a in report.agreement]))
    if report.compile_s:
        parts.append("torch.compile's first calls (compilation): "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in report.compile_s.items()) + ".")
    if report.failures:
        parts.append(markdown_table(["Precision", "Mode", "Failed"],
                                    [[f.precision, f.mode, f.error] for f in report.failures], "lll"))
    return "\n\n".join(parts)


# --- entry point ------------------------------------------------------------------------------------------


def run(options: BenchOptions) -> Section:
    plan = Plan.for_options(options)
    started = time.perf_counter()
    model, manifest = load_checkpoint(resolve_model_dir("default"))
    device, stream = torch.device("cuda"), torch.cuda.Stream()
    frames, source = reference_frames(manifest.input.size)
    bench = Bench(plan, frames, started + plan.budget_s, [], [])
    runners = {}
    for name, dtype in PRECISIONS.items():
        try:
            runners[name] = CudaRunner(model, manifest, RunnerOptions(device, max(plan.batch_sizes), dtype=dtype,
                                                                      stream=stream))
        except Exception as err:  # noqa: BLE001 - e.g. bfloat16 on a device without it; reported
            bench.failures.append(Failure(precision=name, mode="all", error=f"{type(err).__name__}: {err}"[:300]))
    compile_s = {}
    with torch.inference_mode(), torch.cuda.stream(stream):
        log(f"{torch.cuda.get_device_name()}: uploads and agreement")
        upload_rows = uploads(runners["fp32"], plan.batch_sizes)
        agreed = agreement(runners, frames, max(plan.batch_sizes))
        for name, runner in runners.items():
            log(f"{name}: {', '.join(MODES[:4])}")
            bench.precision(name, runner)
        for name in [n for n in plan.compile if n in runners]:
            log(f"{name}: {COMPILE}")
            seconds = bench.compiled(name, runners[name])
            if seconds is not None:
                compile_s[name] = seconds
    major, minor = torch.cuda.get_device_capability()
    report = GpuReport(
        device=torch.cuda.get_device_name(), capability=f"{major}.{minor}", cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(), model=f"{manifest.model_name} {manifest.model_version} (bundled)",
        frames=source, batch_sizes=list(plan.batch_sizes), cell_s=plan.cell_s, cells=bench.cells,
        failures=bench.failures, left_out=bench.left_out, compile_s=compile_s, uploads=upload_rows,
        agreement=agreed, paper=PAPER)
    return Section(name="gpu", title=f"GPU: the fused student on {report.device}", result=report,
                   markdown=render(report))
