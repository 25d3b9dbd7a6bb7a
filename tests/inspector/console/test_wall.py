from __future__ import annotations

from inspector.console.wall import CardFilter, Viewer, Wall


def viewer(rate: float = 10.0, burst: float = 3.5, **wanted) -> Viewer:
    return Viewer(CardFilter(**wanted), rate=rate, burst=burst)


def test_a_page_that_connects_gets_the_newest_matching_cards(make_event) -> None:
    wall = Wall(recent_events=100, dedupe_window=100)
    for i in range(30):
        wall.add(make_event(f"f{i:02d}", camera_id="a" if i % 3 else "b"))
    cards = wall.open(viewer(camera="b"), now=0.0, count=5)
    assert [c["frame_id"] for c in cards] == ["f12", "f15", "f18", "f21", "f24", "f27"][1:]
    assert all(c["camera_id"] == "b" for c in cards)


def test_cards_carry_what_the_page_draws(make_event) -> None:
    wall = Wall(recent_events=10, dedupe_window=10)
    wall.add(make_event("f1", topic="frames.a", partition=2, offset=17, coil_id="C1", strip_offset_m=2.5,
                        boxes=[{"x0": 1, "y0": 2, "x1": 30, "y1": 40, "score": 0.9}]))
    (card,) = wall.open(viewer(), now=0.0, count=10)
    assert card["picture"] == "/frames/frames.a/2/17"
    assert card["boxes"] == [[1, 2, 30, 40, 0.9]]
    assert (card["coil_id"], card["strip_offset_m"], card["label"], card["status"]) == ("C1", 2.5, "crazing", "defect")


def test_each_page_gets_at_most_its_rate_of_cards_however_many_arrive(make_event, clock) -> None:
    """1,000 events/s for 10 s, a page ticking every 0.25 s at 10 cards/s: every event is kept for counting,
    the page gets about 100 cards, the newest of each tick, and no second holds more than 10."""
    wall = Wall(recent_events=1000, dedupe_window=20_000)
    page = viewer(rate=10.0, burst=3.5)
    wall.open(page, clock(), count=0)
    sent_per_second: dict[int, int] = {}
    for tick in range(40):
        for i in range(250):
            wall.add(make_event(f"t{tick}-{i}"))
        clock.now += 0.25
        cards = wall.take(page, clock())
        assert cards and cards[-1]["frame_id"] == f"t{tick}-249"  # the newest arrival is shown
        sent_per_second[tick // 4] = sent_per_second.get(tick // 4, 0) + len(cards)
    assert wall.last_seq == 10_000
    assert all(n <= 10 for n in sent_per_second.values())
    assert sum(sent_per_second.values()) >= 95


def test_filters_select_cards(make_event, clock) -> None:
    wall = Wall(recent_events=100, dedupe_window=100)
    page = viewer(rate=100.0, burst=100.0, label="patches", status="uncertain")
    wall.open(page, clock(), count=10)
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
