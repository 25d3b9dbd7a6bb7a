"""1,000 generated poison records mixed into a valid stream on the local broker: the inspector does not
crash, each poison record lands in the dead-letter topic with the reason its kind must get, and every
valid frame is classified exactly once (tests/inspector/poison.py lists the 26 kinds)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest

from schemas.messages import DeadLetter, DefectEvent
from tests.helpers.harness import Tail, record_figures
from tests.helpers.models import export_tiny, version_dir_name
from tests.helpers.poison import KINDS, MAX_FRAME_BYTES, MAX_PIXELS, poison, valid
from tests.helpers.streams import committed_positions, end_positions, produce, running_service, service_settings

pytestmark = pytest.mark.kafka

POISON = 1000
VALID = 300


def test_a_thousand_poison_records_go_to_the_dead_letter_topic_and_every_valid_frame_is_classified(
        kafka_broker, new_topic, tmp_path):
    rng = random.Random(20250301)
    bad = poison(POISON, rng)
    good = valid(VALID)
    stream = [(p.frame, p) for p in bad] + [(f, None) for f in good]
    rng.shuffle(stream)
    models = tmp_path / "models"
    export_tiny(models / version_dir_name(0, "v1"), "v1")
    settings = service_settings(kafka_broker, new_topic(partitions=2), models, max_batch=16,
                                max_frame_bytes=MAX_FRAME_BYTES, max_pixels=MAX_PIXELS)

    async def scenario():
        async with (Tail(kafka_broker, settings.output_topic) as events,
                    Tail(kafka_broker, settings.dead_letter_topic) as letters,
                    running_service(settings) as run):
            started = time.monotonic()
            acks = await produce(kafka_broker, settings.topic, [frame for frame, _ in stream])
            await events.wait_until(lambda rs: len(rs) >= VALID, 60, "an event per valid frame")
            await letters.wait_until(lambda rs: len(rs) >= POISON, 60, "a dead letter per poison record")
            seconds = time.monotonic() - started
            await asyncio.gather(events.settle(0.5), letters.settle(0.5))
            assert not run.task.done(), "the inspector is still serving"
            return events.records, letters.records, acks, seconds, run.inspector.metrics

    event_records, letter_records, acks, seconds, metrics = asyncio.run(scenario())
    committed = asyncio.run(committed_positions(kafka_broker, settings.topic, settings.group_id))
    assert {p: c for p, c in committed.items() if c is not None} == end_positions(acks)

    expected = {(md.partition, md.offset): item for md, (_, item) in zip(acks, stream, strict=True)}
    dead = [DeadLetter.model_validate_json(r.value) for r in letter_records]
    assert len(dead) == POISON
    by_kind: Counter[str] = Counter()
    for record, letter in zip(letter_records, dead, strict=True):
        item = expected[(letter.source.partition, letter.source.offset)]
        assert item is not None, f"a valid frame was dead-lettered: {letter}"
        assert (letter.reason, letter.source.topic) == (item.reason, settings.topic), item.kind
        assert dict(record.headers)["reason"] == item.reason.encode()
        assert letter.detail and letter.value_bytes == len(item.frame.value or b"")
        by_kind[item.kind] += 1
    assert set(by_kind) == set(KINDS)

    events = [DefectEvent.model_validate_json(r.value) for r in event_records]
    assert sorted(e.frame_id for e in events) == sorted(f.frame_id for f in good)
    for event in events:
        assert expected[(event.source.partition, event.source.offset)] is None

    reasons = Counter(letter.reason for letter in dead)
    for reason, count in reasons.items():
        assert metrics.registry.get_sample_value("inspector_dead_lettered_total", {"reason": reason}) == count
    record_figures("poison", {
        "poison_records": POISON, "valid_frames": VALID, "kinds": len(KINDS), "dead_letters": len(dead),
        "events": len(events), "by_reason": dict(sorted(reasons.items())), "seconds_to_drain": round(seconds, 2),
        "largest_poison_bytes": max(len(p.frame.value or b"") for p in bad),
    })
