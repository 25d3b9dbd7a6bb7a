"""Helpers for the fault and hot-reload tests: `inspector run` as a subprocess, a live tail of an output
topic, a live stream of tiny frames, and the figures each test measured.

With tiny checkpoints (tests.helpers.models.export_tiny: 32×32 inputs) and 32×32 raw frames, inference is
cheap and a test's time goes into what it is testing (restarts, backlogs, swaps), not into convolutions.

Figures: `record_figures(name, {...})` prints one `FIGURES name {json}` line (visible with `-s`) and, when
RELIABILITY_FIGURES_DIR is set, writes `name.json` there; docs/reliability.md quotes them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from inspector.settings import Settings
from tests.helpers.http import http_get
from tests.helpers.streams import Frame, tiny_frame


# -- figures ----------------------------------------------------------------------------------------

def record_figures(name: str, figures: dict[str, Any]) -> None:
    text = json.dumps(figures, sort_keys=True, default=str)
    print(f"\nFIGURES {name} {text}")
    out = os.environ.get("RELIABILITY_FIGURES_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(text + "\n")


# -- the inspector as a subprocess -------------------------------------------------------------------

def settings_env(settings: Settings) -> dict[str, str]:
    """INSPECTOR_* variables that rebuild `settings` in a child process (nested Kafka security excluded;
    other nested settings as JSON)."""
    env = {}
    for name, value in settings.model_dump(mode="json", exclude={"kafka"}).items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = json.dumps(value)
        env[f"INSPECTOR_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


@dataclass
class InspectorProcess:
    """`inspector run` in a child process, configured through the environment, JSON logs in a file.

    The working directory is `workdir` (no stray .env), the HTTP endpoint listens on a free loopback port;
    `env` adds variables (e.g. INSPECTOR_KAFKA__…, which `settings_env` leaves out).
    """

    settings: Settings
    workdir: Path
    name: str = "inspector"
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"{self.name}.log"

    def start(self) -> InspectorProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
        env |= settings_env(self.settings) | {
            "INSPECTOR_LOG_FORMAT": "json", "INSPECTOR_HTTP_HOST": "127.0.0.1", "INSPECTOR_HTTP_PORT": "0",
            "INSPECTOR_THREADS": "1", "PYTHONUNBUFFERED": "1",
        } | self.env
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", "inspector.cli", "run"], env=env, cwd=self.workdir,
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, no goodbye to the group."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: the process does nothing until `thaw`."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGCONT)

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and the exit code (the service drains and commits first)."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise

    def lines(self) -> list[dict[str, Any]]:
        """Every log line so far; a line that is not JSON (a traceback, a C library) is {"raw": text}."""
        out = []
        for text in self.log_path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(text)
            except ValueError:
                doc = None
            out.append(doc if isinstance(doc, dict) else {"raw": text})
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    async def wait_for_log(self, name: str, timeout_s: float = 60.0, count: int = 1) -> dict[str, Any]:
        """The `count`-th log line whose event is `name`; fails if the process exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.events(name)
            if len(found) >= count:
                return found[count - 1]
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before logging {name!r}:\n"
                                     + self.log_path.read_text(errors="replace")[-4000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not log {name!r} within {timeout_s:g}s")
            await asyncio.sleep(0.05)

    def metrics_url(self) -> str:
        listening = self.events("http_listening")
        assert listening, "the HTTP endpoint is not up yet"
        return listening[0]["url"] + "/metrics"

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample of the child's /metrics (blocking; call through asyncio.to_thread in a loop)."""
        from prometheus_client.parser import text_string_to_metric_families

        status, _, body = http_get(self.metrics_url())
        assert status == 200, f"/metrics answered {status}"
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and (labels is None or all(sample.labels.get(k) == v
                                                                  for k, v in labels.items())):
                    return sample.value
        return None


def logged_at(line: dict[str, Any]) -> float:
    """When a JSON log line was written (its ISO `timestamp`), as seconds since the epoch (time.time())."""
    return datetime.fromisoformat(line["timestamp"]).timestamp()


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of the process's resident set (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


def reset_peak_rss(pid: int) -> None:
    """Reset the kernel's high-water mark of the process's resident set to its current size (Linux clear_refs 5),
    so `peak_rss_bytes` afterwards is the peak of what comes next."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# -- reading an output topic while the test runs -------------------------------------------------------

class Tail:
    """Consumes a JSON topic from the beginning in the background: `records` and their parsed `docs` grow
    as they arrive, `frames` counts them by frame_id."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.records: list[ConsumerRecord] = []
        self.docs: list[dict[str, Any]] = []
        self.frames: Counter[str] = Counter()
        self._consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                          enable_auto_commit=False)

    async def __aenter__(self) -> Tail:
        await self._consumer.start()
        self._task: asyncio.Task[None] = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.wait([self._task])  # the reader's cancellation stays here; a cancellation of ours does not
        await self._consumer.stop()
        if not self._task.cancelled() and self._task.exception() is not None:
            raise self._task.exception()  # type: ignore[misc]

    async def _run(self) -> None:
        while True:
            for batch in (await self._consumer.getmany(timeout_ms=100)).values():
                for record in batch:
                    doc = json.loads(record.value)
                    self.records.append(record)
                    self.docs.append(doc)
                    self.frames[doc.get("frame_id") or doc.get("headers", {}).get("frame_id")] += 1

    async def settle(self, quiet_s: float = 1.0) -> None:
        """Wait until nothing new arrived for `quiet_s`."""
        count, since = len(self.records), time.monotonic()
        while time.monotonic() - since < quiet_s:
            await asyncio.sleep(0.1)
            if len(self.records) != count:
                count, since = len(self.records), time.monotonic()

    async def wait_until(self, check: Callable[[Sequence[ConsumerRecord]], bool], timeout_s: float,
                         what: str = "the condition", alive: Callable[[], bool] | None = None) -> float:
        """Seconds it took until `check(records)` held; fails on timeout or when `alive()` turns false."""
        started = time.monotonic()
        while not check(self.records):
            if alive is not None and not alive():
                raise AssertionError(f"the inspector exited while waiting for {what}")
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what} "
                                   f"({len(self.records)} records so far)")
            await asyncio.sleep(0.02)
        return time.monotonic() - started


# -- a live stream of frames ---------------------------------------------------------------------------

class Stream:
    """Produces raw frames at `rate` per second in the background until the block ends (or `limit`);
    `frames` are the ones sent, `acks` their record metadata."""

    def __init__(self, bootstrap: str, topic: str, rate: float, *, cameras: int = 4, limit: int | None = None,
                 prefix: str = "s") -> None:
        self._bootstrap, self._topic, self._rate, self._limit = bootstrap, topic, rate, limit
        self._cameras, self._prefix = cameras, prefix
        self.frames: list[Frame] = []
        self.acks: list[Any] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Stream:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def _run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks="all", linger_ms=2)
        await producer.start()
        pending = []
        try:
            started = time.monotonic()
            while not self._stop.is_set() and (self._limit is None or len(self.frames) < self._limit):
                due = int((time.monotonic() - started) * self._rate) + 1
                if self._limit is not None:
                    due = min(due, self._limit)
                while len(self.frames) < due:
                    frame = tiny_frame(f"{self._prefix}{len(self.frames):06d}", camera=len(self.frames) % self._cameras)
                    self.frames.append(frame)
                    pending.append(await producer.send(self._topic, frame.value, key=frame.key,
                                                       headers=frame.headers))
                await asyncio.sleep(0.01)
            self.acks = list(await asyncio.gather(*pending))
        finally:
            await producer.stop()
