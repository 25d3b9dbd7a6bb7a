from __future__ import annotations

import numpy as np
import pytest

from inspector.console.wall import CardFilter, Viewer, Wall


def viewer(rate: float = 10.0, burst: int = 3, **wanted) -> Viewer:
    return Viewer(CardFilter(**wanted), rate=rate, burst=burst)


def test_a_page_that_connects_gets_the_newest_matching_cards(make_event) -> None:
    wall = Wall(recent_events=100, dedupe_window=100)
    for i in range(30):
        wall.add(make_event(f"f{i:02d}", camera_id="a" if i % 3 else "b"))
    cards = wall.open(viewer(camera="b"), count=5)
    assert [c["frame_id"] for c in cards] == ["f12", "f15", "f18", "f21", "f24", "f27"][1:]
    assert all(c["camera_id"] == "b" for c in cards)


def test_cards_carry_what_the_page_draws(make_event) -> None:
    wall = Wall(recent_events=10, dedupe_window=10)
    wall.add(make_event("f1", topic="frames.a", partition=2, offset=17, coil_id="C1", strip_offset_m=2.5,
                        boxes=[{"x0": 1, "y0": 2, "x1": 30, "y1": 40, "score": 0.9}]))
    (card,) = wall.open(viewer(), count=10)
    assert card["picture"] == "/frames/frames.a/2/17"
    assert card["boxes"] == [[1, 2, 30, 40, 0.9]]
    assert (card["coil_id"], card["strip_offset_m"], card["label"], card["status"]) == ("C1", 2.5, "crazing", "defect")


def most_in_one_second(sent: list[tuple[float, int]]) -> int:
    """The most cards sent within any one-second window [t, t + 1)."""
    return max(sum(n for u, n in sent if t <= u < t + 1.0) for t, _ in sent)


@pytest.mark.parametrize("jitter_s", [0.0, 0.08])
def test_each_page_gets_at_most_its_rate_of_cards_however_many_arrive(make_event, clock, jitter_s) -> None:
    """1,000 events/s for 10 s, a page ticking every 0.25 s plus up to `jitter_s` (a busy loop) at 10 cards/s:
    every event is kept for counting, the page gets about 100 cards, the newest of each tick, at most 3 at
    once, and no one-second window holds more than 10 (however the ticks fall)."""
    wall = Wall(recent_events=1000, dedupe_window=20_000)
    page = viewer(rate=10.0, burst=3)
    wall.open(page, count=0)
    lateness = np.random.default_rng(0).uniform(0.0, jitter_s, 40)
    sent: list[tuple[float, int]] = []
    for tick in range(40):
        for i in range(250):
            wall.add(make_event(f"t{tick}-{i}"))
        clock.now += 0.25 + lateness[tick]
        cards = wall.take(page, clock())
        assert len(cards) <= 3
        assert not cards or cards[-1]["frame_id"] == f"t{tick}-249"  # the newest arrival is shown
        sent.append((clock.now, len(cards)))
    assert wall.last_seq == 10_000
    assert most_in_one_second(sent) == 10
    assert sum(n for _, n in sent) >= 95


def test_a_slow_rate_sends_one_card_per_interval(make_event, clock) -> None:
    wall = Wall(recent_events=100, dedupe_window=100)
    page = viewer(rate=0.5, burst=1)
    wall.open(page, count=0)
    got = []
    for tick in range(16):
        wall.add(make_event(f"f{tick}"))
        clock.now += 0.25
        got.append(len(wall.take(page, clock())))
    assert got == [1, 0, 0, 0, 0, 0, 0, 0] * 2  # one card per 2 s


def test_filters_select_cards(make_event, clock) -> None:
    wall = Wall(recent_events=100, dedupe_window=100)
    page = viewer(rate=100.0, burst=100, label="patches", status="uncertain")
    wall.open(page, count=10)
    wall.add(make_event("match", label="patches", status="uncertain"))
    wall.add(make_event("other-label", label="crazing", status="uncertain"))
    wall.add(make_event("other-status", label="patches", status="defect"))
    clock.now += 1.0
    assert [c["frame_id"] for c in wall.take(page, clock())] == ["match"]


def test_duplicates_are_dropped_and_memory_is_bounded(make_event) -> None:
    wall = Wall(recent_events=5, dedupe_window=8)
    event = make_event("same")
    assert wall.add(event) and not wall.add(event)
    for i in range(20):
        wall.add(make_event(f"f{i}"))
    assert wall.get(str(event.event_id)) is None  # fell off the recent events
    assert wall.get(str(make_event("f19").event_id)) is not None
    assert wall.add(event)  # out of the dedupe window: accepted again
