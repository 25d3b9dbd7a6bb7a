"""What the console counts: every event and dead letter it reads, in memory bounded by its settings.

Counts by class, status and camera; rates per class in time buckets over a window; latency percentiles
over the most recent events; the model versions seen; dead letters by reason; and per coil, each defect
at its position along the strip. Names that come from messages (cameras, classes, coils) are bounded in
number: past `max_keys` they count as `(other)`, past `max_coils` the least recently seen coil is dropped.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.messages import DeadLetter, DefectEvent

OTHER = "(other)"
PERCENTILES = (50, 95, 99)


class BoundedCounter:
    """A Counter that names at most `max_keys` keys; the rest are counted under `(other)`."""

    def __init__(self, max_keys: int) -> None:
        self._max_keys = max_keys
        self.counts: Counter[str] = Counter()

    def add(self, key: str, n: int = 1) -> str:
        """Count `key` and return the name it was counted under."""
        if key not in self.counts and len(self.counts) >= self._max_keys:
            key = OTHER
        self.counts[key] += n
        return key


@dataclass(frozen=True)
class FigureLimits:
    max_keys: int
    max_coils: int
    max_coil_points: int
    latency_samples: int
    rate_window_s: int
    rate_bucket_s: int


class RateSeries:
    """Events per class per bucket over the last `window_s`, as rates (events/s) oldest bucket first."""

    def __init__(self, window_s: int, bucket_s: int) -> None:
        self._bucket_s = bucket_s
        self._buckets = max(1, math.ceil(window_s / bucket_s))
        self._series: deque[tuple[int, Counter[str]]] = deque()

    def add(self, label: str, now: float) -> None:
        index = int(now // self._bucket_s)
        if not self._series or self._series[-1][0] != index:
            self._series.append((index, Counter()))
            self._drop_before(index)
        self._series[-1][1][label] += 1

    def snapshot(self, now: float) -> dict[str, Any]:
        current = int(now // self._bucket_s)
        self._drop_before(current)
        first = current - self._buckets + 1
        by_index = dict(self._series)
        labels = sorted({label for _, counts in self._series for label in counts})
        elapsed = max(1.0, min(self._bucket_s, now - current * self._bucket_s))
        widths = [float(self._bucket_s)] * (self._buckets - 1) + [elapsed]
        rates = {label: [round(by_index.get(first + k, {}).get(label, 0) / widths[k], 3)
                         for k in range(self._buckets)] for label in labels}
        return {"bucket_s": self._bucket_s, "start": first * self._bucket_s, "rates": rates}

    def _drop_before(self, index: int) -> None:
        while self._series and self._series[0][0] <= index - self._buckets:
            self._series.popleft()


@dataclass
class Coil:
    points: deque[tuple[float, str, str]]  # (strip_offset_m, label, event_id)
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class ModelSeen:
    name: str
    version: str
    events: int = 0
    last_seen: float = 0.0


class Figures:
    def __init__(self, limits: FigureLimits) -> None:
        self._limits = limits
        self.events = 0
        self.duplicates = 0
        self.invalid: Counter[str] = Counter()  # topic -> records that are not a valid message
        self.labels = BoundedCounter(limits.max_keys)
        self.statuses: Counter[str] = Counter()
        self.cameras = BoundedCounter(limits.max_keys)
        self.dead_letters: Counter[str] = Counter()
        self._rates = RateSeries(limits.rate_window_s, limits.rate_bucket_s)
        self._latencies: deque[float] = deque(maxlen=limits.latency_samples)
        self._models: OrderedDict[tuple[str, str], ModelSeen] = OrderedDict()
        self._coils: OrderedDict[str, Coil] = OrderedDict()

    def add_event(self, event: DefectEvent, now: float) -> None:
        self.events += 1
        label = self.labels.add(event.label)
        self.statuses[event.status] += 1
        self.cameras.add(event.camera_id)
        self._rates.add(label, now)
        self._latencies.append(event.latency_ms)
        self._add_model(event, now)
        if event.coil_id is not None:
            self._add_to_coil(event, label)

    def add_dead_letter(self, letter: DeadLetter) -> None:
        self.dead_letters[letter.reason] += 1

    def add_invalid(self, topic: str) -> None:
        self.invalid[topic] += 1

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "events": self.events, "duplicates": self.duplicates, "invalid": dict(self.invalid),
            "labels": dict(self.labels.counts), "statuses": dict(self.statuses), "cameras": dict(self.cameras.counts),
            "rates": self._rates.snapshot(now), "latency_ms": self._latency(),
            "models": [{"name": m.name, "version": m.version, "events": m.events,
                        "last_seen_s_ago": round(now - m.last_seen, 1),
                        "in_service": now - m.last_seen <= self._limits.rate_window_s}
                       for m in reversed(self._models.values())],
            "dead_letters": {"total": sum(self.dead_letters.values()), "by_reason": dict(self.dead_letters)},
            "coils": [{"coil_id": coil_id, "events": sum(coil.counts.values())}
                      for coil_id, coil in reversed(self._coils.items())],
        }

    def coil(self, coil_id: str) -> dict[str, Any] | None:
        coil = self._coils.get(coil_id)
        if coil is None:
            return None
        return {"coil_id": coil_id, "counts": dict(coil.counts),
                "length_m": max((p[0] for p in coil.points), default=0.0),
                "points": [list(p) for p in coil.points]}

    def _latency(self) -> dict[str, Any]:
        if not self._latencies:
            return {"n": 0} | {f"p{p}": None for p in PERCENTILES}
        values = np.percentile(np.fromiter(self._latencies, float, len(self._latencies)), PERCENTILES)
        return {"n": len(self._latencies)} | {f"p{p}": round(float(v), 1) for p, v in zip(PERCENTILES, values)}

    def _add_model(self, event: DefectEvent, now: float) -> None:
        key = (event.model.name, event.model.version)
        seen = self._models.pop(key, None) or ModelSeen(*key)
        seen.events += 1
        seen.last_seen = now
        self._models[key] = seen  # most recently seen last
        if len(self._models) > self._limits.max_keys:
            self._models.popitem(last=False)

    def _add_to_coil(self, event: DefectEvent, label: str) -> None:
        assert event.coil_id is not None
        coil = self._coils.pop(event.coil_id, None) or Coil(deque(maxlen=self._limits.max_coil_points))
        coil.counts[label] += 1
        if event.strip_offset_m is not None and math.isfinite(event.strip_offset_m):
            coil.points.append((event.strip_offset_m, label, str(event.event_id)))
        self._coils[event.coil_id] = coil
        if len(self._coils) > self._limits.max_coils:
            self._coils.popitem(last=False)
