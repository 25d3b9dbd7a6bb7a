"""A running tally for the periodic summary log line and the demo's live view.

`Summary` implements the Telemetry protocol (counting what it needs) plus `labelled`, and `Fanout`
sends each telemetry call to several implementations, so the service reports once to both the
metrics and the summary.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from inspector.telemetry import Telemetry
from schemas.checkpoint import Manifest

LATENCY_WINDOW = 2048


@dataclass(frozen=True)
class Snapshot:
    frames: int
    events: int
    dead_letters: int
    batches: int
    per_class: dict[str, int]
    events_per_s: float  # since the previous snapshot
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    mean_batch: float | None
    model_version: str | None
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)

    def as_log(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Summary:
    def __init__(self) -> None:
        self._frames = self._events = self._batches = self._batched = 0
        self._classes: Counter[str] = Counter()
        self._dead: Counter[str] = Counter()
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._model: str | None = None
        self._mark = (time.monotonic(), 0)

    # Telemetry ------------------------------------------------------------------------------------
    def frames_consumed(self, topic: str, partition: int, n: int) -> None:
        self._frames += n

    def events_produced(self, n: int) -> None:
        self._events += n

    def dead_lettered(self, reason: str) -> None:
        self._dead[reason] += 1

    def batch_done(self, size: int, queue_wait_s: float, inference_s: float) -> None:
        self._batches += 1
        self._batched += size

    def event_latency(self, seconds: float) -> None:
        self._latencies.append(seconds)

    def consumer_lag(self, topic: str, partition: int, lag: int) -> None: ...

    def model_active(self, manifest: Manifest) -> None:
        self._model = manifest.model_version

    def model_reload(self, ok: bool, reason: str = "") -> None: ...

    def group_joined(self, joined: bool) -> None: ...

    # extras ---------------------------------------------------------------------------------------
    def labelled(self, labels: list[str]) -> None:
        self._classes.update(labels)

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        then, events_then = self._mark
        self._mark = (now, self._events)
        lat = np.asarray(self._latencies) * 1000 if self._latencies else None
        return Snapshot(
            frames=self._frames, events=self._events, dead_letters=sum(self._dead.values()), batches=self._batches,
            per_class=dict(sorted(self._classes.items())),
            events_per_s=round((self._events - events_then) / max(now - then, 1e-9), 1),
            latency_p50_ms=round(float(np.percentile(lat, 50)), 1) if lat is not None else None,
            latency_p95_ms=round(float(np.percentile(lat, 95)), 1) if lat is not None else None,
            mean_batch=round(self._batched / self._batches, 2) if self._batches else None,
            model_version=self._model, dead_letter_reasons=dict(self._dead),
        )


class Fanout:
    """Telemetry that forwards every call to each of `targets`."""

    def __init__(self, *targets: Telemetry) -> None:
        self._targets = targets

    def frames_consumed(self, topic: str, partition: int, n: int) -> None:
        for t in self._targets:
            t.frames_consumed(topic, partition, n)

    def events_produced(self, n: int) -> None:
        for t in self._targets:
            t.events_produced(n)

    def dead_lettered(self, reason: str) -> None:
        for t in self._targets:
            t.dead_lettered(reason)

    def batch_done(self, size: int, queue_wait_s: float, inference_s: float) -> None:
        for t in self._targets:
            t.batch_done(size, queue_wait_s, inference_s)

    def event_latency(self, seconds: float) -> None:
        for t in self._targets:
            t.event_latency(seconds)

    def consumer_lag(self, topic: str, partition: int, lag: int) -> None:
        for t in self._targets:
            t.consumer_lag(topic, partition, lag)

    def model_active(self, manifest: Manifest) -> None:
        for t in self._targets:
            t.model_active(manifest)

    def model_reload(self, ok: bool, reason: str = "") -> None:
        for t in self._targets:
            t.model_reload(ok, reason)

    def group_joined(self, joined: bool) -> None:
        for t in self._targets:
            t.group_joined(joined)
