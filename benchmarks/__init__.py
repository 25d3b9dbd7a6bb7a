"""Benchmarks: programs that measure and write results (not timed tests). `python -m benchmarks.run` runs all.

The contract a benchmark module `benchmarks/<name>.py` fulfils to be picked up by benchmarks.run:

    def run(options: BenchOptions) -> Section
    def unavailable() -> str | None     # optional: why it cannot run on this machine (then it is skipped)

`Section.result` is a pydantic model (written to `results/<name>.json` inside an envelope with the
machine description and load averages); `Section.markdown` is that benchmark's part of
`results/README.md`. Each benchmark sets its own thread counts, budgets and checks; nothing here
is shared mutable state.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class BenchOptions:
    quick: bool = False  # a smoke run: tiny budgets, fewer cases; numbers are not meant to be quoted
    threads: int | None = None  # intra-op threads for torch and ONNX Runtime; None keeps torch's default


@dataclass(frozen=True)
class Section:
    name: str  # results/<name>.json
    title: str
    result: BaseModel
    markdown: str


class LoadAverage(BaseModel):
    one: float
    five: float
    fifteen: float


class Machine(BaseModel):
    cpu: str
    logical_cpus: int
    python: str
    platform: str
    torch: str
    onnxruntime: str | None
    isa: tuple[str, ...] = ()  # of VECTOR_ISA, the ones this CPU reports (empty in results written before)


def load_average() -> LoadAverage:
    one, five, fifteen = os.getloadavg()
    return LoadAverage(one=one, five=five, fifteen=fifteen)


VECTOR_ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")  # what decides which kernels run


def machine() -> Machine:
    import torch

    from stripnet.bf16 import cpu_flags

    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return Machine(cpu=_cpu_name(), logical_cpus=os.cpu_count() or 0, python=platform.python_version(),
                   platform=platform.platform(), torch=torch.__version__, onnxruntime=ort_version,
                   isa=tuple(flag for flag in VECTOR_ISA if flag in cpu_flags()))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def percentile_ms(seconds: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, q)) if len(seconds) else float("nan")


def markdown_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """`align` holds one of l/r per column (default: first column left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
