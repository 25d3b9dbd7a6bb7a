"""Training on this CPU: what one step and one validation pass of EG-RepVGG cost, with the allocator setting
that `trainer` uses (stripnet.allocator.keep_freed_memory) and with glibc's own, side by side.

The setting is process-wide, so each allocator runs in its own worker process (`python -m benchmarks.train
--worker keep|glibc`), alternately, several rounds each. A worker trains the network from scratch on
synthetic 200×200 gray frames with `trainer.train.train_step`, as `fit` does (one D4 element per image, SGD
with momentum, bf16 autocast where the CPU has bf16 dot products, the trainer's default) and validates it as `fit` does after each
epoch (`trainer.evaluate.predict_logits`). It reports process CPU time, split into user and kernel (page
faults land in kernel time), and minor page faults.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from benchmarks import BenchOptions, Section
from stripnet.allocator import keep_freed_memory
from stripnet.architectures import EG_REPVGG
from stripnet.bf16 import cpu_has_bf16
from stripnet.network import build_model
from stripnet.preprocess import normalize
from schemas.checkpoint import InputSpec
from trainer.data import DIHEDRAL, ImageSet, dihedral_batch
from trainer.evaluate import predict_logits
from trainer.train import train_step

ALLOCATORS = ("keep", "glibc")
BATCH, CLASSES, SIZE = 64, 6, 200


class Cost(BaseModel):
    """One worker's figures: per training step and per validated image."""

    step_user_ms: float
    step_kernel_ms: float
    step_faults: float
    validate_user_ms: float
    validate_kernel_ms: float
    validate_faults: float


class TrainReport(BaseModel):
    steps: int
    validation_images: int
    rounds: int
    bf16: bool
    runs: dict[str, list[Cost]]  # allocator → one Cost per round

    def median(self, allocator: str, field: str) -> float:
        return statistics.median(getattr(c, field) for c in self.runs[allocator])


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _per(before: tuple[float, float, int], count: int) -> tuple[float, float, float]:
    """User ms, kernel ms and minor faults since `before`, per one of `count`."""
    (user0, kernel0, faults0), (user1, kernel1, faults1) = before, _usage()
    return (user1 - user0) * 1e3 / count, (kernel1 - kernel0) * 1e3 / count, (faults1 - faults0) / count


def measure(steps: int, validation_images: int) -> Cost:
    """This process's cost per training step and per validated image (after one warm-up step and pass)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    model = build_model(EG_REPVGG, CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    images = torch.randint(0, 256, (BATCH, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    spec, bf16 = InputSpec(), cpu_has_bf16()

    def step() -> None:
        model.train()
        x = normalize(dihedral_batch(images, torch.randint(0, DIHEDRAL, (BATCH,), generator=gen)), spec)
        train_step(model, opt, x, bf16, lambda logits, _: {"loss": F.cross_entropy(logits, labels)})

    val = ImageSet(torch.randint(0, 256, (validation_images, SIZE, SIZE), dtype=torch.uint8, generator=gen),
                   torch.zeros(validation_images, dtype=torch.long), tuple(f"c{i}" for i in range(CLASSES)),
                   tuple(f"{i}.png" for i in range(validation_images)))
    step()
    predict_logits(model, val, spec)
    before = _usage()
    for _ in range(steps):
        step()
    step_user, step_kernel, step_faults = _per(before, steps)
    before = _usage()
    predict_logits(model, val, spec)
    val_user, val_kernel, val_faults = _per(before, validation_images)
    return Cost(step_user_ms=step_user, step_kernel_ms=step_kernel, step_faults=step_faults,
                validate_user_ms=val_user, validate_kernel_ms=val_kernel, validate_faults=val_faults)


def _worker(allocator: str, steps: int, validation_images: int) -> Cost:
    out = subprocess.run([sys.executable, "-m", "benchmarks.train", "--worker", allocator, str(steps),
                          str(validation_images)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return Cost.model_validate_json(out.stdout.strip().splitlines()[-1])


def run(options: BenchOptions) -> Section:
    steps, images, rounds = (2, 32, 1) if options.quick else (12, 324, 3)
    runs: dict[str, list[Cost]] = {a: [] for a in ALLOCATORS}
    for r in range(rounds):
        for allocator in ALLOCATORS if r % 2 == 0 else ALLOCATORS[::-1]:
            started = time.perf_counter()
            runs[allocator].append(_worker(allocator, steps, images))
            print(f"[bench] train: round {r + 1}/{rounds} {allocator} {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
    report = TrainReport(steps=steps, validation_images=images, rounds=rounds, bf16=cpu_has_bf16(), runs=runs)
    return Section(name="train", title="Training: a step and a validation pass, by allocator", result=report,
                   markdown=render(report))


def render(report: TrainReport) -> str:
    m = report.median

    def total(a: str, part: str) -> float:
        return m(a, f"{part}_user_ms") + m(a, f"{part}_kernel_ms")

    lines = [
        f"EG-RepVGG from scratch, batch {BATCH}, 200×200 gray, one thread, "
        f"{'bf16 autocast' if report.bf16 else 'fp32 (no bf16 dot products on this CPU)'}; per allocator "
        f"{report.rounds} worker process(es), alternating, each {report.steps} steps and one validation pass over "
        f"{report.validation_images} images after a warm-up; medians. keep: `stripnet.allocator.keep_freed_memory`, "
        "as `trainer` sets it; glibc: its defaults. Kernel time is mostly page faults.",
        "",
        "| allocator | step CPU ms (user + kernel) | kernel share | page faults per step | validation CPU ms per "
        "image (user + kernel) | page faults per image |",
        "| :--- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for a in ALLOCATORS:
        step, val = total(a, "step"), total(a, "validate")
        lines.append(f"| {a} | {step:,.0f} ({m(a, 'step_user_ms'):,.0f} + {m(a, 'step_kernel_ms'):,.0f}) | "
                     f"{m(a, 'step_kernel_ms') / step:.0%} | {m(a, 'step_faults'):,.0f} | {val:.2f} "
                     f"({m(a, 'validate_user_ms'):.2f} + {m(a, 'validate_kernel_ms'):.2f}) | "
                     f"{m(a, 'validate_faults'):,.0f} |")
    lines += ["", f"glibc / keep, CPU per step: {total('glibc', 'step') / total('keep', 'step'):.2f}×; per "
              f"validated image: {total('glibc', 'validate') / total('keep', 'validate'):.2f}×"]
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    allocator, n_steps, n_images = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if allocator == "keep" and not keep_freed_memory():
        raise SystemExit("no glibc allocator to set")
    print(measure(n_steps, n_images).model_dump_json())
