"""Everything the page shows, in memory: the wall of cards, the figures, and the state of the Kafka link.

Mutated only on the event loop (the reader parses records in a worker thread, then hands them here).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from inspector.console.figures import FigureLimits, Figures
from inspector.console.settings import ConsoleSettings
from inspector.console.wall import CardFilter, Viewer, Wall
from schemas.messages import DeadLetter, DefectEvent


@dataclass
class Link:
    """What the page says about Kafka: connecting, connected (with partitions assigned) or unreachable."""

    servers: str
    state: str = "connecting"
    detail: str = ""
    since: str = ""
    attempts: int = 0
    partitions: int = 0

    def attempt(self) -> None:
        """A connection attempt starts; a second one means the previous failed."""
        self.attempts += 1
        self._set("connecting" if self.attempts == 1 else "unreachable",
                  "" if self.attempts == 1 else f"retrying (attempt {self.attempts})")

    def up(self) -> None:
        self.attempts = 0
        self._set("connected", "")

    def down(self, detail: str) -> None:
        self._set("unreachable", detail)

    def snapshot(self) -> dict[str, Any]:
        return {"servers": self.servers, "state": self.state, "detail": self.detail, "since": self.since,
                "partitions": self.partitions}

    def _set(self, state: str, detail: str) -> None:
        if state != self.state or not self.since:
            self.since = datetime.now(UTC).isoformat(timespec="seconds")
        self.state, self.detail = state, detail


class Board:
    def __init__(self, settings: ConsoleSettings, clock: Callable[[], float] = time.time) -> None:
        self._settings, self._clock = settings, clock
        self.wall = Wall(settings.recent_events, settings.dedupe_window)
        self.figures = Figures(FigureLimits(
            max_keys=settings.max_keys, max_coils=settings.max_coils, max_coil_points=settings.max_coil_points,
            latency_samples=settings.latency_samples, rate_window_s=settings.rate_window_s,
            rate_bucket_s=settings.rate_bucket_s))
        self.link = Link(settings.bootstrap_servers)
        self._frame_topics: OrderedDict[str, None] = OrderedDict()
        self._stats: tuple[float, bytes] | None = None

    def add_event(self, event: DefectEvent) -> None:
        if not self.wall.add(event):
            self.figures.duplicates += 1
            return
        self.figures.add_event(event, self._clock())
        self._frame_topics[event.source.topic] = None
        self._frame_topics.move_to_end(event.source.topic)
        if len(self._frame_topics) > self._settings.max_keys:
            self._frame_topics.popitem(last=False)

    def add_dead_letter(self, letter: DeadLetter) -> None:
        self.figures.add_dead_letter(letter)

    def add_invalid(self, topic: str) -> None:
        self.figures.add_invalid(topic)

    def is_frame_topic(self, topic: str) -> bool:
        """Pictures are served only from topics that events named as their source."""
        return topic in self._frame_topics

    def viewer(self, wanted: CardFilter) -> Viewer:
        rate = self._settings.max_cards_per_s
        return Viewer(wanted, rate=rate, burst=max(1, math.ceil(rate * self._settings.tick_s)))

    def open(self, viewer: Viewer) -> list[dict[str, Any]]:
        return self.wall.open(viewer, self._settings.wall_cards)

    def take(self, viewer: Viewer) -> list[dict[str, Any]]:
        return self.wall.take(viewer, self._clock())

    def stats(self) -> dict[str, Any]:
        return self.figures.snapshot(self._clock()) | {"kafka": self.link.snapshot(),
                                                       "wall_cards": self._settings.wall_cards}

    def stats_json(self) -> bytes:
        """`stats()` as JSON, computed at most once per `stats_interval_s` for all pages together."""
        now = self._clock()
        if self._stats is None or now - self._stats[0] >= self._settings.stats_interval_s:
            self._stats = (now, orjson.dumps(self.stats()))
        return self._stats[1]

    def coil(self, coil_id: str) -> dict[str, Any] | None:
        return self.figures.coil(coil_id)
