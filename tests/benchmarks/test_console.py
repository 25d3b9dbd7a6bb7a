"""benchmarks/console.py: the events it offers are valid contract messages, and its card-window count."""

from __future__ import annotations

from benchmarks.console import COIL_EVENTS, defect_events, max_in_one_second
from schemas.messages import DefectEvent


def test_offered_events_are_defect_events_that_name_the_frames_on_the_topic() -> None:
    offered = defect_events(COIL_EVENTS + 2, "frames-x", frames_on_topic=5)
    events = [DefectEvent.model_validate_json(value) for _, value in offered]
    assert [e.source.offset for e in events[:7]] == [0, 1, 2, 3, 4, 0, 1]
    assert {e.source.topic for e in events} == {"frames-x"}
    assert [key.decode() for key, _ in offered[:2]] == [e.camera_id for e in events[:2]]
    assert len({e.event_id for e in events}) == len(events)
    assert events[0].coil_id != events[-1].coil_id and events[-1].strip_offset_m == 0.25
    assert all(e.boxes for e in events) and all(e.label == max(e.probabilities, key=e.probabilities.get)
                                                 for e in events)


def test_the_most_cards_in_any_one_second_window() -> None:
    ticks = [(0.0, 3), (0.25, 3), (0.5, 3), (0.75, 1), (1.0, 3)]
    assert max_in_one_second(ticks) == 10  # [0, 1) and [0.25, 1.25) hold 10 each
    assert max_in_one_second([*ticks, (1.2, 2)]) == 12
    assert max_in_one_second([]) == 0
