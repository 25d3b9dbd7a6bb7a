"""Model benchmark: parameters, MACs, batch-1 latency and throughput of the student and its peers.

One process, one thread setting, interleaved rounds: each round visits every (batch size, model)
cell for a short time slice, so background load lands on all models alike. Per cell the budget
is capped by time, not iterations (VGG16 at batch 64 takes seconds per call on 2 cores): a cell
stops being visited once it has spent its budget, after at least one timed call.

Inputs are 200×200 gray frames replicated to 3 channels and normalized as the engine does, in
each engine's preferred layout (channels-last tensors for torch, NCHW arrays for ONNX Runtime,
one channel for the gray-folded variants), prepared outside the timed region. Throughput is
batch / median call time; batch-1 latency percentiles are over the individual batch-1 calls.
The fused student is measured through inspector.runners, i.e. the code the service runs.

Every call is also timed in process CPU time. On a machine that other jobs keep busy, wall time
includes the time this process waits for a core; CPU time per call does not, so `batch / median
CPU time` ("img per CPU-s") is the steadier figure for comparing models under load. With one
intra-op thread it approximates throughput on an idle core; with more, it sums all threads' work.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel
from torch import nn
from torchvision import models as tv

from benchmarks import BenchOptions, Section, markdown_table, percentile_ms
from benchmarks.loadgen import NEU_CLS
from inspector.runners import RUNNERS, RunnerOptions, softmax
from inspector.settings import Settings
from schemas.checkpoint import InputSpec, Manifest
from stripnet.allocator import keep_freed_memory
from stripnet.architectures import EG_REPVGG, REPVGG_A0
from stripnet.bf16 import Bf16Net
from stripnet.bundled import resolve_model_dir
from stripnet.cam import LocateConfig, locate_batch
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import RepNet, build_model, fold_gray, reparameterize
from stripnet.preprocess import normalize, resize
from stripnet.profile import count_head_macs, count_macs, count_parameters

NUM_CLASSES, SIZE = 6, 200
CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
STUDENT, UNFUSED, TEACHER = "KD-EG-RepVGG (fused)", "EG-RepVGG (unfused)", "RepVGG-A0 teacher (fused)"
TORCHVISION: dict[str, Callable[..., nn.Module]] = {
    "ResNet50": tv.resnet50, "VGG16": tv.vgg16, "ShuffleNetV2 x1.0": tv.shufflenet_v2_x1_0,
    "MobileNetV2": tv.mobilenet_v2,
}
Layout = Literal["torch", "numpy"]
SERVED_THREADS = 1  # without --threads: the inspector's default (inspector.settings.Settings.threads)


@dataclass(frozen=True)
class Plan:
    batch_sizes: tuple[int, ...]
    rounds: int
    cell_budget_s: float  # per (model, batch) cell, over all rounds
    compile: bool

    @property
    def target_batch(self) -> int:
        """Issue 7 states its throughput targets at batch 32."""
        return 32 if 32 in self.batch_sizes else self.batch_sizes[-1]

    @staticmethod
    def for_options(options: BenchOptions) -> Plan:
        if options.quick:
            return Plan(batch_sizes=(1, 8), rounds=2, cell_budget_s=0.2, compile=False)
        return Plan(batch_sizes=(1, 8, 32, 64), rounds=5, cell_budget_s=3.0, compile=True)


@dataclass(frozen=True)
class Case:
    model: str
    engine: str
    fn: Callable[[Any], object]
    layout: Layout
    channels: int
    parameters: int
    macs: int
    setup_s: float
    max_abs_diff: float | None = None  # vs eager torch on the same fused weights
    prepare: Callable[[torch.Tensor], object] | None = None  # uint8 gray (N, S, S) → this engine's input


@dataclass(frozen=True)
class FailedCase:
    model: str
    engine: str
    error: str


@dataclass
class Cell:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    warm_s: float | None = None


class CellResult(BaseModel):
    batch: int
    calls: int
    images_per_s: float  # batch / median wall time per call
    images_per_s_mean: float  # batch × calls / total wall time
    p50_ms: float  # wall time per call
    p99_ms: float
    images_per_cpu_s: float  # batch / median process CPU time per call
    cpu_p50_ms: float


class Row(BaseModel):
    model: str
    engine: str
    input_channels: int
    parameters: int
    macs: int
    setup_s: float
    max_abs_diff: float | None
    cells: list[CellResult]
    error: str | None = None

    def cell(self, batch: int) -> CellResult | None:
        return next((c for c in self.cells if c.batch == batch), None)


class Ratio(BaseModel):
    student_engine: str
    peer: str
    batch: int
    wall: float | None  # ratio of images/s
    cpu: float | None  # ratio of images per CPU-second


class Target(BaseModel):
    target: str
    measured: str
    met: bool | None


class PrepRow(BaseModel):
    method: str
    cpu_ms: dict[int, float]  # batch → median CPU ms per call


class ModelReport(BaseModel):
    torch_threads: int
    torch_interop_threads: int
    student_weights: str
    batch_sizes: list[int]
    target_batch: int
    rounds: int
    cell_budget_s: float
    load_average_1min_per_round: list[float]
    note: str
    rows: list[Row]
    ratios: list[Ratio]
    targets: list[Target]
    preparation: list[PrepRow]
    agreement: list[Agreement] = []
    allocator: str = ""  # absent from results recorded before it was a field: those ran glibc's default


def log(message: str) -> None:
    print(f"[bench model] {message}", file=sys.stderr, flush=True)


# --- the models -----------------------------------------------------------------------------------------


def student_checkpoint(tmp: Path) -> tuple[RepNet, Manifest, str]:
    """The bundled trained model when present, else a fused random-weight one (speed does not depend on weights)."""
    try:
        model, manifest = load_checkpoint(resolve_model_dir("default"))
        return model, manifest, f"bundled trained model {manifest.model_name} {manifest.model_version}"
    except FileNotFoundError:
        torch.manual_seed(0)
        export_checkpoint(_random_bn(build_model(EG_REPVGG, NUM_CLASSES)), tmp / "student", class_names=CLASSES,
                          model_name="kd-eg-repvgg-random", model_version="bench")
        model, manifest = load_checkpoint(tmp / "student")
        return model, manifest, "random initialisation (no bundled model at stripnet/default_model)"


def _random_bn(model: RepNet) -> RepNet:
    """BN statistics as after training (not 0/1), so logits carry signal and the max-Δ check means something."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def eager(model: nn.Module) -> Callable[[torch.Tensor], object]:
    model = model.eval().to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return model(x)
    return forward


def eager_case(name: str, factory: Callable[[], nn.Module]) -> Case:
    log(f"setting up {name}")
    t0 = time.perf_counter()
    model = factory().eval()
    fn = eager(model)
    return Case(name, "torch eager", fn, "torch", 3, count_parameters(model), count_macs(model, SIZE),
                time.perf_counter() - t0)


def student_cases(model: RepNet, manifest: Manifest, plan: Plan, threads: int) -> list[Case | FailedCase]:
    variants: list[tuple[str, str, dict[str, Any]]] = [
        ("torch eager", "torch", {}),
        ("torch eager, gray folded", "torch", {"fold_gray": True}),
        ("onnxruntime", "onnxruntime", {"exporter": "dynamo"}),
        ("onnxruntime, gray folded", "onnxruntime", {"exporter": "dynamo", "fold_gray": True}),
        ("onnxruntime (torchscript export)", "onnxruntime", {"exporter": "torchscript"}),
        (BF16_SERVED, "bf16", {"fold_gray": True}),
        # the unknown detector's cost (docs/openset.md): the served engines without it, beside the rows above
        (f"{ORT_SERVED}, {NO_DETECTOR}", "onnxruntime", {"exporter": "dynamo", "fold_gray": True, "detector": False}),
        (f"{BF16_SERVED}, {NO_DETECTOR}", "bf16", {"fold_gray": True, "detector": False}),
    ]
    if plan.compile:
        variants.append(("torch.compile", "compile", {}))
    reference = _frames(8, manifest)
    with torch.inference_mode():
        expected = model(reference).numpy()
    cases: list[Case | FailedCase] = []
    for engine, backend_name, kwargs in variants:
        log(f"setting up {STUDENT} / {engine}")
        t0 = time.perf_counter()
        try:
            served, served_manifest = (model, manifest) if kwargs.get("detector", True) else without_detector(model,
                                                                                                          manifest)
            backend = RUNNERS[backend_name](served, served_manifest, RunnerOptions(  # type: ignore[index]
                torch.device("cpu"), max(plan.batch_sizes), threads=threads, fold_gray=kwargs.get("fold_gray", False),
                exporter=kwargs.get("exporter", "dynamo")))
            for batch in plan.batch_sizes:  # warmed up, as the service's loader does
                backend.forward(backend.prepare(torch.zeros(batch, SIZE, SIZE, dtype=torch.uint8)))
        except Exception as err:  # noqa: BLE001 - a backend that cannot be built is reported, not fatal
            cases.append(FailedCase(STUDENT, engine, f"{type(err).__name__}: {err}"[:300]))
            continue
        setup_s = time.perf_counter() - t0
        if getattr(backend, "exporter", "dynamo") != kwargs.get("exporter", "dynamo"):
            engine += f" ({backend.exporter} export: dynamo failed)"  # type: ignore[attr-defined]
        channels = backend.spec.channels
        diff = float(np.abs(backend.forward(reference[:, :channels]) - expected).max())
        net = without_head(fold_gray(model, manifest.input)[0] if channels == 1 else model)  # not run without --locate
        cases.append(Case(STUDENT, engine, backend.forward, "numpy" if backend_name == "onnxruntime" else "torch",
                          channels, count_parameters(net), count_macs(net, SIZE, channels), setup_s, diff,
                          backend.prepare))
    return cases + bf16_alternatives(model, manifest, plan, reference, expected) + locate_cases(model)


LOCATE_HEAD = "torch eager, --locate: localization head's boxes"
LOCATE_CAM = "torch eager, --locate: CAM boxes"


def locate_cases(model: RepNet) -> list[Case | FailedCase]:
    """What `inspector run --locate` runs (stripnet.cam.locate_batch, logits and boxes in one pass), with the
    localization head (docs/locate.md) and with the CAM, beside the plain rows: the head's cost is the difference."""
    net = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    cases: list[Case | FailedCase] = []
    for engine, method in ((LOCATE_HEAD, "head"), (LOCATE_CAM, "cam")):
        if method == "head" and net.boxes is None:
            cases.append(FailedCase(STUDENT, engine, "the student checkpoint has no localization head"))
            continue
        config = LocateConfig(method=method)
        macs = count_macs(net, SIZE) + (count_head_macs(net, SIZE) if method == "head" else 0)
        cases.append(Case(STUDENT, engine, lambda x, c=config: locate_batch(net, x, c), "torch", 3,
                          count_parameters(net if method == "head" else without_head(net)), macs, 0.0))
    return cases


def without_head(model: RepNet) -> RepNet:
    plain = copy.deepcopy(model)
    plain.boxes = None
    return plain


BF16_SERVED = "bf16 (served: convolutions in bf16), gray folded"
NO_DETECTOR = "no unknown detector"


def without_detector(model: RepNet, manifest: Manifest) -> tuple[RepNet, Manifest]:
    """The same network without its unknown detector: what the detector costs is the difference."""
    plain = copy.deepcopy(model)
    plain.ood = None
    return plain, manifest.model_copy(update={"ood": None})
ORT_SERVED = "onnxruntime, gray folded"  # the fp32 backend the service falls back to


def bf16_alternatives(model: RepNet, manifest: Manifest, plan: Plan, reference: torch.Tensor,
                      expected: np.ndarray) -> list[Case | FailedCase]:
    """What the served bf16 runner was chosen against: torch.autocast on the whole network (the issue's starting
    point) and torch.compile of the served module, both on the gray-folded network, channels-last."""
    net, spec = fold_gray(without_head(model), manifest.input)
    net = net.eval().to(memory_format=torch.channels_last)

    def autocast(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x).float().numpy()

    variants: list[tuple[str, Callable[[], Callable[[torch.Tensor], np.ndarray]]]] = [
        ("torch.autocast bf16 (whole network), gray folded", lambda: autocast)]
    if plan.compile:
        def compiled() -> Callable[[torch.Tensor], np.ndarray]:
            module = torch.compile(Bf16Net(net))

            def forward(x: torch.Tensor) -> np.ndarray:
                with torch.inference_mode():
                    return module(x).float().numpy()
            return forward
        variants.append(("torch.compile of the served bf16 module, gray folded", compiled))
    cases: list[Case | FailedCase] = []
    for engine, factory in variants:
        log(f"setting up {STUDENT} / {engine}")
        t0 = time.perf_counter()
        try:
            fn = factory()
            for batch in plan.batch_sizes:
                fn(normalize(torch.zeros(batch, SIZE, SIZE, dtype=torch.uint8), spec, channels_last=True))
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            cases.append(FailedCase(STUDENT, engine, f"{type(err).__name__}: {err}"[:300]))
            continue
        diff = float(np.abs(fn(reference[:, :1].contiguous(memory_format=torch.channels_last)) - expected).max())
        cases.append(Case(STUDENT, engine, fn, "torch", 1, count_parameters(net), count_macs(net, SIZE, 1),
                          time.perf_counter() - t0, diff,
                          lambda pixels, spec=spec: normalize(pixels, spec, channels_last=True)))
    return cases


# --- bf16 against fp32 on the dataset -------------------------------------------------------------------


class Agreement(BaseModel):
    engine: str
    images: int
    argmax_agree: int
    max_prob_diff: float
    p99_prob_diff: float
    over_gate_limit: int  # images whose largest probability difference exceeds the load gate's 1e-2
    accuracy: float | None  # against the folder labels
    fp32_accuracy: float | None


def dataset_images(size: int) -> tuple[np.ndarray, list[str]] | None:
    files = sorted(NEU_CLS.rglob("*.jpg")) if NEU_CLS.is_dir() else []
    if not files:
        return None
    return (np.stack([resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), size) for f in files]),
            [f.parent.name for f in files])


def agreement(cases: list[Case], manifest: Manifest, quick: bool) -> list[Agreement]:
    """Every bf16 engine against fp32 eager torch on all NEU-CLS images (every 20th in a quick run)."""
    data = dataset_images(manifest.input.size)
    fp32 = next((c for c in cases if c.model == STUDENT and c.engine == "torch eager, gray folded"), None)
    if data is None or fp32 is None:
        return []
    images, folders = data
    if quick:
        images, folders = images[::20], folders[::20]
    labels = np.array([manifest.class_names.index(f) if f in manifest.class_names else -1 for f in folders])

    def probabilities(case: Case) -> np.ndarray:
        assert case.prepare is not None
        return np.concatenate([softmax(np.asarray(case.fn(case.prepare(torch.from_numpy(images[i:i + 32])))))
                               for i in range(0, len(images), 32)])

    reference = probabilities(fp32)
    known = labels >= 0
    out = []
    for case in cases:
        if case.model != STUDENT or "bf16" not in case.engine:
            continue
        log(f"agreement on {len(images)} images: {case.engine}")
        probs = probabilities(case)
        diff = np.abs(probs.astype(np.float64) - reference).max(axis=1)
        out.append(Agreement(
            engine=case.engine, images=len(images), argmax_agree=int((probs.argmax(1) == reference.argmax(1)).sum()),
            max_prob_diff=round(float(diff.max()), 5), p99_prob_diff=round(float(np.percentile(diff, 99)), 5),
            over_gate_limit=int((diff > 1e-2).sum()),
            accuracy=round(float((probs.argmax(1) == labels)[known].mean()), 4) if known.any() else None,
            fp32_accuracy=round(float((reference.argmax(1) == labels)[known].mean()), 4) if known.any() else None))
    return out


def all_cases(plan: Plan, threads: int, tmp: Path) -> tuple[list[Case | FailedCase], Manifest, str]:
    student, manifest, source = student_checkpoint(tmp)
    cases = student_cases(student, manifest, plan, threads)
    torch.manual_seed(0)
    cases.append(eager_case(UNFUSED, lambda: build_model(EG_REPVGG, NUM_CLASSES)))
    cases.append(eager_case(TEACHER, lambda: reparameterize(build_model(REPVGG_A0, NUM_CLASSES))))
    for name, factory in TORCHVISION.items():
        cases.append(eager_case(name, lambda f=factory: f(weights=None, num_classes=NUM_CLASSES)))
    return cases, manifest, source


# --- inputs ---------------------------------------------------------------------------------------------


def _frames(batch: int, manifest: Manifest) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    images = torch.randint(0, 256, (batch, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    return normalize(images, manifest.input)


class Inputs:
    """Prepared inputs per (layout, channels, batch), made once, outside the timed region."""

    def __init__(self, max_batch: int) -> None:
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (max_batch, SIZE, SIZE), dtype=torch.uint8, generator=gen)
        self._base = normalize(images, InputSpec())
        self._cache: dict[tuple[Layout, int, int], Any] = {}

    def get(self, layout: Layout, channels: int, batch: int) -> Any:
        key = (layout, channels, batch)
        if key not in self._cache:
            x = self._base[:batch, :channels]
            self._cache[key] = (np.ascontiguousarray(x.numpy()) if layout == "numpy"
                                else x.contiguous(memory_format=torch.channels_last))
        return self._cache[key]


# --- timing ---------------------------------------------------------------------------------------------


def time_slice(fn: Callable[[Any], object], x: Any, seconds: float) -> tuple[list[float], list[float]]:
    """Back-to-back calls until `seconds` have passed (at least one call): per-call wall and CPU seconds."""
    wall: list[float] = []
    cpu: list[float] = []
    gc.collect()
    gc.disable()
    try:
        end = time.perf_counter() + seconds
        while True:
            t0, c0 = time.perf_counter(), time.process_time()
            fn(x)
            t1, c1 = time.perf_counter(), time.process_time()
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
            if t1 >= end:
                return wall, cpu
    finally:
        gc.enable()


def warm_up(cases: list[Case], cells: dict[tuple[int, int], Cell], inputs: Inputs, plan: Plan) -> None:
    """One untimed call per cell, except where a linear estimate from the smaller batch says it takes > 1 s."""
    for i, case in enumerate(cases):
        previous: tuple[int, float] | None = None
        for batch in plan.batch_sizes:
            if previous is not None and previous[1] * batch / previous[0] > 1.0:
                break
            x = inputs.get(case.layout, case.channels, batch)
            t0 = time.perf_counter()
            case.fn(x)
            cells[i, batch].warm_s = time.perf_counter() - t0
            previous = (batch, cells[i, batch].warm_s)


def measure(cases: list[Case], inputs: Inputs, plan: Plan) -> tuple[dict[tuple[int, int], Cell], list[float]]:
    cells = {(i, b): Cell() for i in range(len(cases)) for b in plan.batch_sizes}
    log("warming up")
    warm_up(cases, cells, inputs, plan)
    slice_s, loads = plan.cell_budget_s / plan.rounds, []
    for r in range(plan.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        log(f"round {r + 1}/{plan.rounds} (load average {loads[-1]:.2f})")
        for batch in plan.batch_sizes:
            for i, case in enumerate(cases):
                cell = cells[i, batch]
                if cell.wall and sum(cell.wall) >= plan.cell_budget_s:
                    continue
                wall, cpu = time_slice(case.fn, inputs.get(case.layout, case.channels, batch), slice_s)
                cell.wall += wall
                cell.cpu += cpu
    return cells, loads


def replicate_then_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """The order serving used before stripnet.preprocess.normalize: expand to 3 channels, then normalize."""
    norm = InputSpec().normalization
    mean, std = torch.tensor(norm.mean).view(1, -1, 1, 1), torch.tensor(norm.std).view(1, -1, 1, 1)
    x = pixels.to(torch.float32).div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def measure_preparation(cases: list[Case], plan: Plan) -> list[PrepRow]:
    methods = {"replicate, then normalize (3 ch, channels-last)": replicate_then_normalize}
    for case in cases:
        if case.prepare is not None and case.engine in {"torch eager", "torch eager, gray folded", "onnxruntime",
                                                        "onnxruntime, gray folded"}:
            methods[f"{case.engine}: backend.prepare ({case.channels} ch)"] = case.prepare
    gen = torch.Generator().manual_seed(0)
    out = []
    for method, fn in methods.items():
        cpu_ms = {}
        for batch in plan.batch_sizes:
            pixels = torch.randint(0, 256, (batch, SIZE, SIZE), dtype=torch.uint8, generator=gen)
            fn(pixels)
            _, cpu = time_slice(fn, pixels, plan.cell_budget_s / 10)
            cpu_ms[batch] = round(percentile_ms(cpu, 50), 3)
        out.append(PrepRow(method=method, cpu_ms=cpu_ms))
    return out


# --- results --------------------------------------------------------------------------------------------


def cell_result(batch: int, cell: Cell) -> CellResult:
    t, c = np.asarray(cell.wall), np.asarray(cell.cpu)
    return CellResult(batch=batch, calls=len(t), images_per_s=round(batch / float(np.median(t)), 1),
                      images_per_s_mean=round(batch * len(t) / float(t.sum()), 1),
                      p50_ms=round(percentile_ms(t, 50), 3), p99_ms=round(percentile_ms(t, 99), 3),
                      images_per_cpu_s=round(batch / max(float(np.median(c)), 1e-9), 1),
                      cpu_p50_ms=round(percentile_ms(c, 50), 3))


def rows(cases: list[Case | FailedCase], measured: list[Case], cells: dict[tuple[int, int], Cell],
         plan: Plan) -> list[Row]:
    out, index = [], {id(case): i for i, case in enumerate(measured)}
    for case in cases:
        if isinstance(case, FailedCase):
            out.append(Row(model=case.model, engine=case.engine, input_channels=0, parameters=0, macs=0, setup_s=0,
                           max_abs_diff=None, cells=[], error=case.error))
            continue
        i = index[id(case)]
        out.append(Row(model=case.model, engine=case.engine, input_channels=case.channels,
                       parameters=case.parameters, macs=case.macs, setup_s=round(case.setup_s, 2),
                       max_abs_diff=case.max_abs_diff,
                       cells=[cell_result(b, cells[i, b]) for b in plan.batch_sizes if cells[i, b].wall]))
    return out


def _ips(row: Row | None, batch: int, cpu: bool = False) -> float | None:
    cell = row.cell(batch) if row is not None else None
    if cell is None:
        return None
    return cell.images_per_cpu_s if cpu else cell.images_per_s


def _ratio(student: Row | None, peer: Row | None, batch: int, cpu: bool) -> float | None:
    s, p = _ips(student, batch, cpu), _ips(peer, batch, cpu)
    return round(s / p, 2) if s and p else None


def _find(table: list[Row], model: str, engine: str = "torch eager") -> Row | None:
    return next((r for r in table if r.model == model and r.engine == engine and not r.error), None)


def best_student(table: list[Row], batch: int) -> Row | None:
    """The student engine with the highest wall-clock throughput at `batch`."""
    candidates = [r for r in table if r.model == STUDENT and not r.error and r.cell(batch)]
    return max(candidates, key=lambda r: r.cell(batch).images_per_s, default=None)  # type: ignore[union-attr]


def students(table: list[Row], batch: int) -> list[Row]:
    """The student on eager torch, then its fastest engine at `batch` if that is another one."""
    eager_row, best = _find(table, STUDENT), best_student(table, batch)
    rows_ = [eager_row] if eager_row is not None else []
    return rows_ + [best] if best is not None and best is not eager_row else rows_


PEERS = (UNFUSED, TEACHER, *TORCHVISION)


def ratios(table: list[Row], plan: Plan) -> list[Ratio]:
    out = []
    for batch in plan.batch_sizes:
        for student in students(table, plan.target_batch):
            for peer in PEERS:
                peer_row = _find(table, peer)
                out.append(Ratio(student_engine=student.engine, peer=peer, batch=batch,
                                 wall=_ratio(student, peer_row, batch, False),
                                 cpu=_ratio(student, peer_row, batch, True)))
    return out


def bf16_target(table: list[Row], plan: Plan, agreed: list[Agreement]) -> list[Target]:
    """Issue 14: the served bf16 runner ≥ 1.8× fp32 ONNX Runtime per CPU-second, with its agreement beside it."""
    b = plan.target_batch
    bf16, ort = _find(table, STUDENT, BF16_SERVED), _find(table, STUDENT, ORT_SERVED)
    cpu, wall = _ratio(bf16, ort, b, True), _ratio(bf16, ort, b, False)
    if cpu is None:
        return []
    served = next((a for a in agreed if a.engine == BF16_SERVED), None)
    beside = ("no dataset: agreement not measured" if served is None else
              f"argmax agree on {served.argmax_agree:,}/{served.images:,} images, max prob Δ {served.max_prob_diff:.4f}")
    return [Target(target=f"bf16 (served) ≥ 1.8× {ORT_SERVED} per CPU-second at batch {b} (issue 14)",
                   measured=f"{cpu:.2f}× (wall: {_num(wall, '{:.2f}×')}); {beside}", met=cpu >= 1.8)]


def targets(table: list[Row], plan: Plan) -> list[Target]:
    """Issue 7's targets, judged on wall-clock throughput; the CPU-time ratio is shown beside it."""
    out, b = [], plan.target_batch
    for peer, factor in ((UNFUSED, 2.0), ("MobileNetV2", 10.0), ("ShuffleNetV2 x1.0", 10.0)):
        for student in students(table, b):
            wall, cpu = (_ratio(student, _find(table, peer), b, c) for c in (False, True))
            if wall is None:
                continue
            out.append(Target(target=f"fused ≥ {factor:g}× {peer} at batch {b} ({student.engine})",
                              measured=f"{wall:.2f}× (CPU time: {_num(cpu, '{:.2f}×')})", met=wall >= factor))
    for student in [r for r in table if r.model == STUDENT and not r.error]:
        cell = student.cell(1)
        if cell is not None:
            out.append(Target(target=f"batch-1 latency ≤ 1 ms ({student.engine})",
                              measured=f"p50 {cell.p50_ms:.2f} ms, p99 {cell.p99_ms:.2f} ms "
                                       f"(CPU p50 {cell.cpu_p50_ms:.2f} ms)", met=cell.p50_ms <= 1.0))
    return out


# --- markdown -------------------------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _num(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def main_table(report: ModelReport) -> str:
    bs = report.batch_sizes
    header = ["Model", "Engine", "Params", "MMACs", "b1 p50 ms", "b1 p99 ms", *[f"img/s @{b}" for b in bs],
              "b1 CPU ms", *[f"img/CPU-s @{b}" for b in bs], "max Δ"]
    body = []
    for r in report.rows:
        if r.error:
            body.append([r.model, r.engine, "–", "–", f"failed: {r.error[:80]}", *[""] * (len(header) - 5)])
            continue
        one = r.cell(1)
        body.append([r.model, r.engine, _count(r.parameters), f"{r.macs / 1e6:,.1f}",
                     _num(one and one.p50_ms, "{:.2f}"), _num(one and one.p99_ms, "{:.2f}"),
                     *[_num(_ips(r, b)) for b in bs], _num(one and one.cpu_p50_ms, "{:.2f}"),
                     *[_num(_ips(r, b, cpu=True)) for b in bs], _num(r.max_abs_diff, "{:.1e}")])
    return markdown_table(header, body, "ll" + "r" * (len(header) - 2))


def ratio_table(report: ModelReport) -> str:
    bs = report.batch_sizes
    keys = list(dict.fromkeys((x.student_engine, x.peer) for x in report.ratios))
    body = []
    for engine, peer in keys:
        cells = []
        for b in bs:
            x = next((x for x in report.ratios if (x.student_engine, x.peer, x.batch) == (engine, peer, b)), None)
            cells.append("" if x is None else f"{_num(x.wall, '{:.1f}×')} / {_num(x.cpu, '{:.1f}×')}")
        body.append([f"fused student ({engine}) vs {peer}", *cells])
    return markdown_table(["Throughput ratio, wall / CPU time", *[f"@{b}" for b in bs]], body)


def agreement_table(report: ModelReport) -> str:
    if not report.agreement:
        return "bf16 against fp32: no NEU-CLS images here, not measured."
    body = [[a.engine, f"{a.argmax_agree:,} / {a.images:,}", f"{a.max_prob_diff:.4f}", f"{a.p99_prob_diff:.4f}",
             str(a.over_gate_limit), _num(a.accuracy, "{:.2%}"), _num(a.fp32_accuracy, "{:.2%}")]
            for a in report.agreement]
    return ("bf16 against fp32 (eager torch) on every NEU-CLS image: the same argmax, the largest and the 99th "
            "percentile of each image's largest class-probability difference, the images over the load gate's "
            "1e-2, and accuracy against the folder labels (all images, training ones included).\n\n"
            + markdown_table(["bf16 engine", "argmax agree", "max prob Δ", "p99 prob Δ", "> 1e-2",
                              "accuracy", "fp32 accuracy"], body))


def render(report: ModelReport) -> str:
    target_body = [[t.target, t.measured, {True: "yes", False: "**no**", None: "–"}[t.met]] for t in report.targets]
    return "\n\n".join([
        f"{report.torch_threads} intra-op thread(s) for torch and ONNX Runtime; fp32 unless the engine says bf16, "
        f"channels-last, "
        f"`torch.inference_mode`; 6 classes, 200×200 input, 3 channels (gray-folded rows: 1). "
        + (f"Allocator: {report.allocator}. " if report.allocator else "") +
        f"Student weights: {report.student_weights}. {report.rounds} interleaved rounds, "
        f"≤ {report.cell_budget_s:g} s per cell (at least one call). img/s = batch / median wall time per call; "
        f"img/CPU-s = batch / median process CPU time per call (steadier under background load). "
        f"max Δ = largest absolute logit difference from eager torch on the same fused weights. "
        f"Load average (1 min) per round: {', '.join(f'{x:.2f}' for x in report.load_average_1min_per_round)}.",
        report.note,
        main_table(report),
        "Ratios compare the student's throughput with each peer's eager-torch throughput at the same batch size; "
        f"the second group uses the student's fastest engine at batch {report.target_batch}.",
        ratio_table(report),
        markdown_table(["Target", "Measured", "Met"], target_body, "lrl"),
        agreement_table(report),
        "Input preparation, uint8 gray frames → normalized model input (median CPU ms per call). Gray folding "
        "lets the engine skip the replication; the first row is the order serving used before "
        "stripnet.preprocess.normalize: replicate to 3 channels, then normalize.",
        markdown_table(["Preparation", *[f"@{b}" for b in report.batch_sizes]],
                       [[r.method, *[_num(r.cpu_ms.get(b), "{:.3f}") for b in report.batch_sizes]]
                        for r in report.preparation]),
    ])


# --- entry point ----------------------------------------------------------------------------------------


def served_allocator() -> str:
    """This process's allocator set as `inspector run` sets it by default (the eager torch engines fault on
    every batch without it; ONNX Runtime keeps its own arena); what it is, for the report."""
    if Settings.model_fields["keep_freed_memory"].default and keep_freed_memory():
        return "glibc keeping freed memory (stripnet.allocator, as inspector run by default)"
    return "glibc's default"


def run(options: BenchOptions) -> Section:
    torch.set_num_threads(options.threads or SERVED_THREADS)
    allocator = served_allocator()
    threads, plan = torch.get_num_threads(), Plan.for_options(options)
    log(f"{threads} threads, batch sizes {plan.batch_sizes}, {plan.rounds} rounds, {plan.cell_budget_s} s per cell")
    with tempfile.TemporaryDirectory() as tmp:
        cases, manifest, source = all_cases(plan, threads, Path(tmp))
    measured = [c for c in cases if isinstance(c, Case)]
    cells, loads = measure(measured, Inputs(max(plan.batch_sizes)), plan)
    log("timing input preparation")
    preparation = measure_preparation(measured, plan)
    table = rows(cases, measured, cells, plan)
    agreed = agreement(measured, manifest, options.quick)
    report = ModelReport(
        torch_threads=threads, torch_interop_threads=torch.get_num_interop_threads(), student_weights=source,
        batch_sizes=list(plan.batch_sizes), target_batch=plan.target_batch, rounds=plan.rounds,
        cell_budget_s=plan.cell_budget_s, allocator=allocator,
        load_average_1min_per_round=loads, rows=table, ratios=ratios(table, plan),
        targets=targets(table, plan) + bf16_target(table, plan, agreed), preparation=preparation, agreement=agreed,
        note=("Measured while other jobs ran (load average above half the cores): see the load averages. "
              "Numbers are comparable within this run, not absolute."
              if max(loads, default=0.0) > 0.5 * (os.cpu_count() or 1) else "The machine was otherwise idle."),
    )
    return Section(name="model", title="Model: KD-EG-RepVGG and peers on this CPU", result=report,
                   markdown=render(report))
