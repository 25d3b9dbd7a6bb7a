"""The wall of cards: the most recent events, and which of them each page gets.

Every event read is kept (up to `recent_events`) with a sequence number. A page is a `Viewer` with its
filter and its card budget: on each tick it gets the newest matching events it has not seen, at most
`max_cards_per_s` in any one-second window; the ones it skipped are still counted (figures.py), just not drawn.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from inspector.console.pictures import picture_path
from schemas.messages import DefectEvent


@dataclass(frozen=True)
class CardFilter:
    label: str | None = None
    status: str | None = None
    camera: str | None = None

    def matches(self, event: DefectEvent) -> bool:
        return ((self.label is None or event.label == self.label)
                and (self.status is None or event.status == self.status)
                and (self.camera is None or event.camera_id == self.camera))


@dataclass
class Viewer:
    """One connected page: what it wants to see, what it has seen, and its card budget: at most `rate` cards
    in any one-second window (below one a second: one card per 1/rate seconds), and at most `burst` at once,
    so the cards of a second come a few each tick rather than all on its first."""

    filter: CardFilter
    rate: float
    burst: int
    seen_seq: int = 0
    sent: deque[float] = field(default_factory=deque)  # when each card of the current window was sent

    def budget(self, now: float) -> int:
        window_s = max(1.0, 1.0 / self.rate)
        while self.sent and self.sent[0] <= now - window_s:
            self.sent.popleft()
        return max(0, min(self.burst, max(1, int(self.rate * window_s)) - len(self.sent)))

    def spend(self, now: float, cards: int) -> None:
        self.sent.extend([now] * cards)


@dataclass
class Entry:
    seq: int
    event: DefectEvent
    _card: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def card(self) -> dict[str, Any]:
        if self._card is None:
            self._card = card(self.event)
        return self._card


def card(event: DefectEvent) -> dict[str, Any]:
    """What a card shows. Text fields go to the page as data; the page sets them as text, never as markup."""
    return {
        "event_id": str(event.event_id), "camera_id": event.camera_id, "frame_id": event.frame_id,
        "coil_id": event.coil_id, "strip_offset_m": event.strip_offset_m, "label": event.label,
        "confidence": event.confidence, "status": event.status, "latency_ms": round(event.latency_ms, 1),
        "model_version": event.model.version, "emitted_at": event.times.emitted_at.isoformat(),
        "picture": picture_path(event.source),
        "boxes": None if event.boxes is None else [[b.x0, b.y0, b.x1, b.y1, b.score] for b in event.boxes],
    }


class Wall:
    def __init__(self, recent_events: int, dedupe_window: int) -> None:
        self._entries: deque[Entry] = deque(maxlen=recent_events)
        self._by_id: dict[str, Entry] = {}
        self._ids: deque[str] = deque()
        self._id_set: set[str] = set()
        self._dedupe_window = dedupe_window
        self._seq = 0

    @property
    def last_seq(self) -> int:
        return self._seq

    def add(self, event: DefectEvent) -> bool:
        """Keep `event`; False if its id was seen recently (an at-least-once re-delivery)."""
        event_id = str(event.event_id)
        if event_id in self._id_set:
            return False
        self._remember(event_id)
        self._seq += 1
        if len(self._entries) == self._entries.maxlen:
            self._by_id.pop(str(self._entries[0].event.event_id), None)
        entry = Entry(self._seq, event)
        self._entries.append(entry)
        self._by_id[event_id] = entry
        return True

    def get(self, event_id: str) -> DefectEvent | None:
        entry = self._by_id.get(event_id)
        return entry.event if entry else None

    def open(self, viewer: Viewer, count: int) -> list[dict[str, Any]]:
        """The newest `count` matching cards for a page that just connected (oldest first); they are its
        starting wall, outside its budget."""
        viewer.seen_seq = self._seq
        viewer.sent.clear()
        return self._newest(viewer.filter, count, after=0)

    def take(self, viewer: Viewer, now: float) -> list[dict[str, Any]]:
        """The newest matching cards `viewer` has not seen, within its budget (oldest first)."""
        budget = viewer.budget(now)
        if not budget:
            return []
        cards = self._newest(viewer.filter, budget, after=viewer.seen_seq)
        viewer.seen_seq = self._seq  # what it skipped now, it never gets: the wall shows the present
        viewer.spend(now, len(cards))
        return cards

    def _newest(self, wanted: CardFilter, count: int, after: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for entry in reversed(self._entries):
            if entry.seq <= after or len(found) >= count:
                break
            if wanted.matches(entry.event):
                found.append(entry.card)
        return found[::-1]

    def _remember(self, event_id: str) -> None:
        self._ids.append(event_id)
        self._id_set.add(event_id)
        if len(self._ids) > self._dedupe_window:
            self._id_set.discard(self._ids.popleft())

