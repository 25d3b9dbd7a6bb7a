"""The service's one metrics object: the Prometheus registry, the health state and what the summary needs.

Every piece reports here at the moment something happens (a fetch, a batch, an acknowledged output, a
model swap, a rebalance). `/metrics` renders the registry, `/live` and `/ready` read `health()`, and
the periodic `summary` log line reads `summary()`, whose counts come from the registry itself. A new
metric is one attribute, one reporting method and, if the summary shows it, one line in `summary()`.

Each instance has its own registry, so two services in one process (tests) never share counters.
Methods may be called from the event loop or from worker threads (the model store runs in one):
prometheus-client metrics are thread-safe, and the rest sits behind a lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar, get_args

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from schemas.checkpoint import Manifest
from schemas.messages import DeadLetter, DefectEvent, EventStatus

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
EVENT_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_WINDOW = 2048  # the summary's latency percentiles are over the most recent events

P = ParamSpec("P")
T = TypeVar("T")


def with_thread_cpu_time(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> tuple[T, float]:
    """`fn`'s result and the CPU time the calling thread spent in it (the time of threads it hands work to, such
    as a runtime's own pool with `--threads` above 1, not counted). For worker threads, to report what a stage
    costs apart from the time it waited for a core."""
    started = time.thread_time()
    result = fn(*args, **kwargs)
    return result, time.thread_time() - started


@dataclass(frozen=True)
class Health:
    """What `/live` and `/ready` report: a consistent snapshot of the service's state."""

    live: bool
    ready: bool
    group_joined: bool
    model_name: str | None
    model_version: str | None
    failure: str | None


@dataclass(frozen=True)
class Summary:
    """The periodic summary line (and the end-of-run line)."""

    frames: int
    events: int
    dead_letters: int
    batches: int
    per_class: dict[str, int]
    per_status: dict[str, int]  # defect, uncertain, unknown
    events_per_s: float  # since the previous summary
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    mean_batch: float | None
    model_version: str | None
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)

    def as_log(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Metrics:
    def __init__(self, namespace: str = "inspector") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self._frames = Counter("frames_consumed", "Frames read from Kafka", ["topic", "partition"],
                               namespace=ns, registry=r)
        self._events = Counter("events_produced", "Defect events produced (acknowledged by the broker)",
                               namespace=ns, registry=r)
        self._classes = Counter("events_by_class", "Defect events produced, by label", ["label"],
                                namespace=ns, registry=r)
        self._statuses = Counter("events_by_status", "Defect events produced, by status (defect, uncertain, unknown)",
                                 ["status"], namespace=ns, registry=r)
        for status in get_args(EventStatus):
            self._statuses.labels(status=status)
        self._dead = Counter("dead_lettered", "Frames sent to the dead-letter topic", ["reason"],
                             namespace=ns, registry=r)
        self._batch = Histogram("batch_size", "Frames per inference batch", buckets=BATCH_SIZE_BUCKETS,
                                namespace=ns, registry=r)
        self._queue_wait = Histogram("queue_wait_seconds", "Time a batch's oldest frame waited in the queue",
                                     buckets=QUEUE_WAIT_BUCKETS, namespace=ns, registry=r)
        self._inference = Histogram("inference_seconds", "Model time per batch (preprocess + forward)",
                                    buckets=INFERENCE_BUCKETS, namespace=ns, registry=r)
        self._inference_cpu = Counter("inference_cpu_seconds", "CPU time the inference threads spent on batches "
                                      "(less than inference_seconds when they wait for a core; a runtime's own "
                                      "pool threads, with --threads above 1, not counted)", namespace=ns, registry=r)
        self._decode_cpu = Counter("decode_cpu_seconds", "CPU time the decode threads spent on fetched records",
                                   namespace=ns, registry=r)
        self._latency = Histogram("event_latency_seconds", "Frame produce timestamp to event emitted",
                                  buckets=EVENT_LATENCY_BUCKETS, namespace=ns, registry=r)
        self._lag = Gauge("consumer_lag", "Messages behind the partition's end offset", ["topic", "partition"],
                          namespace=ns, registry=r)
        self._model = Info("model", "The model serving now", namespace=ns, registry=r)
        self._reloads = Counter("model_reloads", "Model reload attempts by result", ["result"],
                                namespace=ns, registry=r)
        self._backend = Info("backend", "The inference backend requested and the one serving the current model, "
                                        "its precision and the bf16 accuracy gate's verdict (accepted, rejected, "
                                        "none: not gated)", namespace=ns, registry=r)
        self._joined_gauge = Gauge("consumer_group_joined", "1 while partitions are assigned to this consumer",
                                   namespace=ns, registry=r)
        self._ready_gauge = Gauge("ready", "1 while /ready answers 200", namespace=ns, registry=r)
        for result in ("success", "failure"):
            self._reloads.labels(result=result)
        self._lock = threading.Lock()
        self._manifest: Manifest | None = None
        self._joined = False
        self._failure: str | None = None
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._mark = (time.monotonic(), 0.0)  # (when, events) of the previous summary

    # -- what the pieces report ---------------------------------------------------------------------

    def frames_consumed(self, topic: str, partition: int, n: int) -> None:
        self._frames.labels(topic=topic, partition=str(partition)).inc(n)

    def consumer_lag(self, topic: str, partition: int, lag: int) -> None:
        self._lag.labels(topic=topic, partition=str(partition)).set(max(0, lag))

    def decoded(self, cpu_s: float) -> None:
        self._decode_cpu.inc(max(0.0, cpu_s))

    def batch_done(self, size: int, queue_wait_s: float, inference_s: float, inference_cpu_s: float) -> None:
        self._batch.observe(size)
        self._queue_wait.observe(max(0.0, queue_wait_s))
        self._inference.observe(max(0.0, inference_s))
        self._inference_cpu.inc(max(0.0, inference_cpu_s))

    def produced(self, messages: Sequence[DefectEvent | DeadLetter]) -> None:
        """Outputs the broker acknowledged."""
        for message in messages:
            if isinstance(message, DeadLetter):
                self._dead.labels(reason=message.reason).inc()
                continue
            self._events.inc()
            self._classes.labels(label=message.label).inc()
            self._statuses.labels(status=message.status).inc()
            # A producer clock ahead of ours gives a negative latency: count it as zero, not as a bogus sum.
            latency_s = max(0.0, (message.times.emitted_at - message.times.produced_at).total_seconds())
            self._latency.observe(latency_s)
            with self._lock:
                self._latencies.append(latency_s)

    def model_active(self, manifest: Manifest) -> None:
        self._model.info({"name": manifest.model_name, "version": manifest.model_version,
                          "sha256": manifest.weights_sha256})
        with self._lock:
            self._manifest = manifest
        self._update_ready()

    def backend_serving(self, *, requested: str, serving: str, precision: str, gate: str) -> None:
        self._backend.info({"requested": requested, "serving": serving, "precision": precision, "gate": gate})

    def model_reload(self, ok: bool) -> None:
        self._reloads.labels(result="success" if ok else "failure").inc()

    def group_joined(self, joined: bool) -> None:
        if not joined:
            self._lag.clear()  # lag of partitions we no longer own would be stale: the new owner reports it
        with self._lock:
            self._joined = joined
        self._joined_gauge.set(1 if joined else 0)
        self._update_ready()

    def failed(self, reason: str) -> None:
        """Mark the process dead (`/live` answers 503) after an unrecoverable error, so it is restarted."""
        with self._lock:
            self._failure = reason
        self._update_ready()

    # -- what is read -------------------------------------------------------------------------------

    def health(self) -> Health:
        with self._lock:
            m, joined, failure = self._manifest, self._joined, self._failure
        return Health(live=failure is None, ready=failure is None and m is not None and joined,
                      group_joined=joined, model_name=m.model_name if m else None,
                      model_version=m.model_version if m else None, failure=failure)

    @property
    def ready(self) -> bool:
        return self.health().ready

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)

    def summary(self) -> Summary:
        """Counts so far (read from the registry), and events/s since the previous summary."""
        now = time.monotonic()
        events = _sample(self._events, "_total")
        batches, batched = _sample(self._batch, "_count"), _sample(self._batch, "_sum")
        with self._lock:
            (then, events_then), self._mark = self._mark, (now, events)
            latencies = np.asarray(self._latencies) * 1000 if self._latencies else None
            manifest = self._manifest
        dead = _by_label(self._dead, "reason")
        p50, p95 = np.percentile(latencies, [50, 95]) if latencies is not None else (None, None)
        return Summary(
            frames=int(_sample(self._frames, "_total")), events=int(events), dead_letters=sum(dead.values()),
            batches=int(batches), per_class=dict(sorted(_by_label(self._classes, "label").items())),
            per_status=_by_label(self._statuses, "status"),
            events_per_s=round((events - events_then) / max(now - then, 1e-9), 1),
            latency_p50_ms=None if p50 is None else round(float(p50), 1),
            latency_p95_ms=None if p95 is None else round(float(p95), 1),
            mean_batch=round(batched / batches, 2) if batches else None,
            model_version=manifest.model_version if manifest else None, dead_letter_reasons=dead,
        )

    def _update_ready(self) -> None:
        self._ready_gauge.set(1 if self.ready else 0)


def _sample(metric: MetricWrapperBase, suffix: str) -> float:
    """The sum over all label sets of one sample kind (`_total`, `_count`, `_sum`) of a metric."""
    return sum(s.value for family in metric.collect() for s in family.samples if s.name.endswith(suffix))


def _by_label(counter: Counter, label: str) -> dict[str, int]:
    return {s.labels[label]: int(s.value) for family in counter.collect() for s in family.samples
            if s.name.endswith("_total")}
