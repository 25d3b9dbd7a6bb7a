"""GPU utilisation and memory while a phase runs: NVML (nvidia-ml-py) when importable, else nvidia-smi, else none.

    with GpuMonitor() as monitor:
        ...                      # sampled every `interval_s` on a thread
    monitor.summary()            # {"source", "samples", "util_mean_pct", "util_max_pct", "memory_max_mib"} or None

The device is the first one CUDA_VISIBLE_DEVICES names (by index), else index 0: the one `inspector run
--device cuda` uses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from types import TracebackType

Sample = tuple[float, float]  # utilisation %, memory used MiB
Reader = Callable[[], Sample]


def device_index() -> int:
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def nvml_reader(index: int) -> Reader | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001 - no NVML (module, library or driver): try nvidia-smi
        return None

    def read() -> Sample:
        util, memory = pynvml.nvmlDeviceGetUtilizationRates(handle), pynvml.nvmlDeviceGetMemoryInfo(handle)
        return float(util.gpu), memory.used / 2**20

    return read


def smi_reader(index: int) -> Reader | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    command = [smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", f"--id={index}"]

    def read() -> Sample:
        util, used = subprocess.run(command, capture_output=True, text=True, check=True, timeout=5).stdout.split(",")
        return float(util), float(used)

    return read


class GpuMonitor:
    def __init__(self, interval_s: float = 0.2) -> None:
        index = device_index()
        nvml, smi = nvml_reader(index), smi_reader(index)
        self._read, self.source = (nvml, "nvml") if nvml else (smi, "nvidia-smi") if smi else (None, "none")
        self._interval_s = interval_s
        self._samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._samples.append(self._read())  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - a failed sample is skipped, not fatal
                continue

    def __enter__(self) -> GpuMonitor:
        if self._read is not None:
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def summary(self) -> dict[str, float | int | str] | None:
        if not self._samples:
            return None
        utils, memory = [s[0] for s in self._samples], [s[1] for s in self._samples]
        return {"source": self.source, "samples": len(self._samples),
                "util_mean_pct": round(sum(utils) / len(utils), 1), "util_max_pct": max(utils),
                "memory_max_mib": round(max(memory))}
