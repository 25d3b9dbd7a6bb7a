"""Where a process's CPU time goes: py-spy samples grouped into the inspector's stages and threads.

`py-spy record --nonblocking` samples the target's Python stacks (the target is not paused, so the
overhead on it is small); idle threads are left out, so a category's samples / (rate × duration) is
the number of cores it kept busy. A sample belongs to the first category matched walking its stack
from the innermost frame outwards, skipping generic frames (asyncio, threading, ...): a send inside
aiokafka called from the sink counts as "Kafka client", a numpy call inside the engine as
"preprocessing". Native code (OpenCV, ONNX Runtime) shows as the Python frame that called it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from pydantic import BaseModel

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode (OpenCV, header checks)", ("inspector/decode.py", "cv2")),
    ("inference (ONNX Runtime / torch)", ("onnxruntime", "inspector/runners.py", "torch/")),
    ("preprocessing (resize, normalize)", ("stripnet/preprocess.py",)),
    ("events and JSON (pydantic, orjson, uuid)", ("inspector/outputs.py", "inspector/records.py",
                                                   "inspector/codec.py", "pydantic", "orjson", "schemas/messages.py",
                                                   "uuid.py")),
    ("Kafka client (aiokafka)", ("aiokafka", "kafka/")),
    ("metrics and logs", ("prometheus_client", "inspector/metrics.py", "inspector/endpoints.py", "aiohttp",
                          "structlog", "inspector/logs.py")),
    ("pipeline (source, batcher, sink, offsets)", ("inspector/source.py", "inspector/batcher.py",
                                                    "inspector/sink.py", "inspector/offsets.py",
                                                    "inspector/service.py")),
)
OTHER = "event loop and other"
GENERIC = ("asyncio/", "threading.py", "selectors.py", "concurrent/", "contextlib.py", "functools.py", "typing.py",
           "<frozen", "runpy", "queue.py")
HOTTEST = 12
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


class Share(BaseModel):
    name: str
    cores: float  # samples / (rate × duration)
    share: float  # of all samples


class Profile(BaseModel):
    duration_s: float
    rate_hz: int
    samples: int
    categories: list[Share]
    threads: list[Share]
    hottest: list[Share]  # innermost frames (self time), the top ones


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, rate_hz: int = 100) -> subprocess.Popen[bytes] | None:
    """Start sampling `pid` for `seconds` in the background; None when py-spy is not installed."""
    binary = py_spy()
    if binary is None:
        return None
    return subprocess.Popen([binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                             "--rate", str(rate_hz), "--format", "raw", "--nonblocking", "--threads",
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summarize(raw: Path, seconds: float, rate_hz: int = 100) -> Profile:
    """Collapsed stacks ("thread (tid): name;frame;frame... count") → cores per category and per thread."""
    categories: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        threads[_thread_name(frames[0])] += int(count)
        categories[_category(frames[1:])] += int(count)
        leaves[frames[-1] if len(frames) > 1 else "(no Python frame)"] += int(count)
    total = sum(categories.values())

    def shares(counter: Counter[str], top: int | None = None) -> list[Share]:
        return [Share(name=name, cores=round(n / (rate_hz * seconds), 3), share=round(n / max(total, 1), 3))
                for name, n in counter.most_common(top)]

    return Profile(duration_s=seconds, rate_hz=rate_hz, samples=total, categories=shares(categories),
                   threads=shares(threads), hottest=shares(leaves, HOTTEST))


def _thread_name(head: str) -> str:
    """'thread (123): asyncio_0' → 'asyncio_*' (worker pools grouped)."""
    name = head.split(":", 1)[1].strip() if ":" in head else head
    return re.sub(r"_\d+$", "_*", name)


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        match = FRAME.match(frame)
        file = match["file"] if match else frame
        if any(g in file for g in GENERIC):
            continue
        for name, patterns in CATEGORIES:
            if any(p in file for p in patterns):
                return name
    return OTHER
