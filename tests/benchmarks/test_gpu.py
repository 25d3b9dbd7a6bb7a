"""benchmarks/gpu.py without a GPU: `make bench` skips it and keeps its last results; its report renders.

The measurements themselves need CUDA (scripts/gpu-check runs them); the report is built here from figures
made up for the test, so a rendering mistake shows up on this machine, not in a scarce GPU session.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from benchmarks import LoadAverage, load_average, machine
from benchmarks.gpu import COMPILE, EAGER, GRAPH, MODES, PAPER, SERVICE, SERVICE_GRAPH, Agreement, Cell, Failure, \
    GpuReport, Upload, render, unavailable
from benchmarks.run import ResultFile, main


def test_without_cuda_the_gpu_benchmark_is_skipped_and_its_last_results_stay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    previous = ResultFile(benchmark="gpu", title="GPU: earlier run", command="python -m benchmarks.run --only gpu",
                          started_at=datetime(2026, 1, 1, tzinfo=UTC), duration_s=1.0, machine=machine(),
                          load_average_start=load_average(), load_average_end=LoadAverage(one=0, five=0, fifteen=0),
                          options={}, markdown="figures measured on a GPU", result={})
    (tmp_path / "gpu.json").write_text(previous.model_dump_json())
    before = (tmp_path / "gpu.json").read_bytes()
    assert main(["--only", "gpu", "--out", str(tmp_path)]) == 0
    assert "gpu: skipped (no CUDA device" in capsys.readouterr().err
    assert (tmp_path / "gpu.json").read_bytes() == before
    assert "figures measured on a GPU" in (tmp_path / "README.md").read_text()
    assert unavailable() == "no CUDA device (torch.cuda.is_available() is False)"


def made_up_report() -> GpuReport:
    speed = {SERVICE: 1.0, SERVICE_GRAPH: 2.0, EAGER: 3.0, GRAPH: 6.0, COMPILE: 5.0}
    factor = {"fp32": 1.0, "fp16": 1.5, "bf16": 1.4}
    cells = [Cell(precision=p, mode=m, batch=b, calls=10, p50_ms=b / (speed[m] * factor[p] * 100),
                  p99_ms=2 * b / (speed[m] * factor[p] * 100), images_per_s=speed[m] * factor[p] * 100 * (1 + b / 32))
             for p in factor for m in MODES for b in (1, 32) if not (m == COMPILE and p != "fp16")]
    return GpuReport(device="Made-up GPU", capability="9.0", cuda="13.0", cudnn=91000, model="kd-eg-repvgg test",
                     frames="64 random frames", batch_sizes=[1, 32], cell_s=0.4, cells=cells,
                     failures=[Failure(precision="bf16", mode=COMPILE, error="RuntimeError: made up")], left_out=3,
                     compile_s={"fp16": 12.5}, uploads=[Upload(batch=32, ms=0.05, gb_per_s=25.6)],
                     agreement=[Agreement(precision="fp16", frames=64, same_label=64, max_probability_diff=0.002)],
                     paper=PAPER)


def test_the_report_puts_every_mode_the_paper_and_the_choice_side_by_side() -> None:
    text = render(made_up_report())
    rows = [line for line in text.splitlines() if line.startswith(("| fp16 | service", "| fp16 | device"))]
    assert len(rows) == 2 * len(MODES)  # throughput and latency tables, every mode measured for fp16
    assert "| paper: KD-EG-RepVGG, RTX 3060 | 2.4 ms | 408 |" in text
    assert "this device, device-side only (best: fp16, device: CUDA graph)" in text
    # fp16 with a graph, 1.5 × 2.0 the fp32 eager service path at batch 32
    assert "| 32 | 200 | fp16, service path, CUDA graph | 600 | 3.00× |" in text
    assert "| 32 | 0.050 | 25.6 | 16% |" in text  # of the fp32 service path's 0.32 ms and "| fp16 | 64 | 64 | 0.0020 |" in text
    assert "fp16 12.5 s" in text and "RuntimeError: made up" in text and "3 cells were left out" in text
    assert GpuReport.model_validate_json(made_up_report().model_dump_json()).cell("fp16", GRAPH, 32) is not None
