"""What the GPU tests share: the CUDA skip, reference frames, and the GPU side of a profiler trace.

Reference frames are NEU-CLS images when the dataset is there ($NEU_CLS_DIR, which scripts/gpu-check
sets to the copy it carried, else the folder next to the repository), otherwise blocky synthetic frames.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.helpers import NEU_CLS

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="no CUDA device (torch.cuda.is_available() is False)")


def neu_cls_dir() -> Path | None:
    root = Path(os.environ.get("NEU_CLS_DIR", NEU_CLS))
    return root if root.is_dir() else None


@dataclass(frozen=True)
class Frames:
    images: list[np.ndarray]  # (H, W) uint8 gray
    source: str
    real: bool  # NEU-CLS images (a trained model is confident on them), not synthetic ones


def reference_frames(per_class: int = 100, synthetic: int = 256, seed: int = 0) -> Frames:
    """Up to `per_class` NEU-CLS images per class, decoded as serving decodes them, else synthetic frames."""
    root = neu_cls_dir()
    if root is not None:
        paths = [p for folder in sorted(d for d in root.iterdir() if d.is_dir())
                 for p in sorted(folder.glob("*.jpg"))[:per_class]]
        images = [cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_GRAYSCALE) for p in paths]
        return Frames(images, f"{len(images)} NEU-CLS images from {root}", real=True)
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(synthetic):
        coarse = rng.integers(0, 256, (26, 26), dtype=np.uint8)
        images.append(np.kron(coarse, np.ones((8, 8), dtype=np.uint8))[:200, :200].copy())
    return Frames(images, f"{synthetic} synthetic blocky frames (no NEU-CLS found)", real=False)


@dataclass(frozen=True)
class GpuActivity:
    kind: str  # "kernel" or "memcpy"
    name: str
    stream: int
    start_us: float
    end_us: float
    bytes: int | None

    @property
    def host_to_device(self) -> bool:
        return self.kind == "memcpy" and "htod" in self.name.lower()

    @property
    def pinned(self) -> bool:
        return "pinned" in self.name.lower()

    def overlaps(self, other: GpuActivity) -> bool:
        return self.start_us < other.end_us and other.start_us < self.end_us


def gpu_activities(work: Callable[[], object]) -> list[GpuActivity]:
    """Run `work` under the PyTorch profiler and return what the GPU did (kernels and copies, all streams)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        work()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        profile.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    kinds = {"kernel": "kernel", "gpu_memcpy": "memcpy"}
    return [GpuActivity(kinds[e["cat"]], e["name"], int(e["args"]["stream"]), float(e["ts"]),
                        float(e["ts"]) + float(e["dur"]), e["args"].get("bytes"))
            for e in events if e.get("ph") == "X" and e.get("cat") in kinds]


def default_stream_id() -> int:
    """The profiler's id of the default stream: the stream a kernel launched outside any stream context runs on."""
    def on_default_stream() -> None:
        with torch.cuda.stream(torch.cuda.default_stream()):
            torch.ones(1024, device="cuda").mul_(2)

    return next(a.stream for a in gpu_activities(on_default_stream) if a.kind == "kernel")
