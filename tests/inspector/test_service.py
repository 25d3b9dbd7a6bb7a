"""The inspector against the real local broker: one event per frame, dead letters, commits, restarts."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import pytest
from structlog.testing import capture_logs

from inspector.app import build
from inspector.broker import free_port
from inspector.codec import loads
from schemas.messages import DeadLetter, DefectEvent, event_id_for
from stripnet.bundled import default_model_dir
from stripnet.cam import locate_batch
from stripnet.checkpoint import load_checkpoint
from stripnet.preprocess import preprocess
from tests.helpers import NEU_CLASSES
from tests.helpers.models import export_untrained
from tests.helpers.poison import encode, png_header
from trainer.data import read_image
from tests.helpers.streams import (
    Frame, committed_positions, encoded_frame, end_positions, image_frames, produce, raw_frames, read_records,
    running_service, service_settings,
)

pytestmark = pytest.mark.kafka


def neu_sample(root, per_class: int):
    return [p for name in NEU_CLASSES for p in sorted((root / name).iterdir())[:per_class]]


async def assert_all_committed(settings, produced) -> None:
    """The group's committed position is just past the last produced frame, on every partition."""
    committed = await committed_positions(settings.bootstrap_servers, settings.topic, settings.group_id)
    ends = end_positions(produced)
    assert committed == {p: ends.get(p) for p in committed}


def test_neu_frames_in_one_valid_event_each_out(kafka_broker, new_topic, published_model_dir, neu_cls):
    settings = service_settings(kafka_broker, new_topic(partitions=3), published_model_dir)
    frames = image_frames(neu_cls, neu_sample(neu_cls, 3), camera_id="cam-a")
    frames += image_frames(neu_cls, neu_sample(neu_cls, 1)[::-1][:3], camera_id="cam-b")

    async def scenario():
        async with running_service(settings):
            produced = await produce(kafka_broker, settings.topic, frames)
            await read_records(kafka_broker, settings.output_topic, len(frames))
            records = await read_records(kafka_broker, settings.output_topic, len(frames) + 1, timeout_s=0.5)
        await assert_all_committed(settings, produced)
        return records

    records = asyncio.run(scenario())
    events = [DefectEvent.model_validate_json(r.value) for r in records]
    assert len(events) == len(frames)
    assert Counter((e.camera_id, e.frame_id) for e in events) == Counter(
        (f.key.decode(), f.frame_id) for f in frames)
    for record, event in zip(records, events, strict=True):
        assert record.key == event.camera_id.encode()
        assert event.event_id == event_id_for(event.camera_id, event.frame_id, "v1")
        assert event.model.version == "v1" and event.label in NEU_CLASSES
        assert sum(event.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert event.confidence == max(event.probabilities.values())
        assert event.status == ("defect" if event.confidence >= settings.confidence_threshold else "uncertain")
        assert event.source.topic == settings.topic
        t = event.times
        kafka_ms = timedelta(milliseconds=1)  # Kafka timestamps have millisecond resolution
        assert t.captured_at - kafka_ms <= t.produced_at <= t.received_at <= t.inferred_at <= t.emitted_at
        assert event.boxes is None
    assert len({(e.source.partition, e.source.offset) for e in events}) == len(events)


def test_bundled_model_labels_neu_frames_right(kafka_broker, new_topic, neu_cls):
    if not (default_model_dir() / "manifest.json").is_file():
        pytest.skip("no bundled model yet (stripnet/default_model/): the label check waits for it")
    settings = service_settings(kafka_broker, new_topic(partitions=2), None)
    frames = image_frames(neu_cls, neu_sample(neu_cls, 8))

    async def scenario():
        async with running_service(settings):
            await produce(kafka_broker, settings.topic, frames)
            return await read_records(kafka_broker, settings.output_topic, len(frames))

    events = [loads(r.value) for r in asyncio.run(scenario())]
    assert len(events) == len(frames)
    right = sum(e["label"] == e["frame_id"].split("/")[0] for e in events)
    assert right / len(events) >= 0.9, f"{right}/{len(events)} labels agree with their folder"


def test_locate_puts_the_bundled_models_head_boxes_in_its_events(kafka_broker, new_topic, neu_cls):
    if (default_model_dir() / "manifest.json").is_file():
        model, manifest = load_checkpoint(default_model_dir())
    if not (default_model_dir() / "manifest.json").is_file() or manifest.boxes is None:
        pytest.skip("the bundled model has no localization head (trainer boxes --model stripnet/default_model …)")
    settings = service_settings(kafka_broker, new_topic(partitions=2), None, locate=True)
    paths = neu_sample(neu_cls, 2)
    frames = image_frames(neu_cls, paths)

    async def scenario():
        async with running_service(settings):
            await produce(kafka_broker, settings.topic, frames)
            return await read_records(kafka_broker, settings.output_topic, len(frames))

    events = {e.frame_id: e for e in (DefectEvent.model_validate_json(r.value) for r in asyncio.run(scenario()))}
    images = [read_image(p, "gray") for p in paths]
    expected = locate_batch(model, preprocess(images, manifest.input), frame_sizes=[i.shape for i in images]).boxes
    assert len(events) == len(frames) and sum(map(len, expected)) >= len(frames) // 2
    for frame, boxes in zip(frames, expected, strict=True):
        got = events[frame.frame_id].boxes or []
        assert len(got) == len(boxes)  # the head's boxes, as stripnet computes them
        for a, b in zip(got, boxes, strict=True):
            assert max(abs(a.x0 - b.x0), abs(a.y0 - b.y0), abs(a.x1 - b.x1), abs(a.y1 - b.y1)) <= 1
            assert a.score == pytest.approx(b.score, abs=1e-3)


def test_bad_frames_go_to_the_dead_letter_topic_and_the_stream_goes_on(kafka_broker, new_topic, published_model_dir):
    settings = service_settings(kafka_broker, new_topic(partitions=1), published_model_dir, max_pixels=512 * 512)
    good = raw_frames(4)
    stream = [
        good[0],
        encoded_frame("empty", b"", "png"),
        good[1],
        encoded_frame("bomb", png_header(50_000, 50_000), "png"),
        Frame(b"cam-1", encode(".png"), [("camera_id", b"cam-1")], "no-headers"),
        good[2],
        encoded_frame("truncated", encode(".jpg")[:300], "jpeg"),
        good[3],
    ]

    async def scenario():
        async with running_service(settings):
            produced = await produce(kafka_broker, settings.topic, stream)
            events = await read_records(kafka_broker, settings.output_topic, 4)
            letters = await read_records(kafka_broker, settings.dead_letter_topic, 4)
        await assert_all_committed(settings, produced)
        return events, letters

    events, letters = asyncio.run(scenario())
    assert [loads(r.value)["frame_id"] for r in events] == [f.frame_id for f in good]
    assert [loads(r.value)["source"]["offset"] for r in events] == [0, 2, 5, 7]
    dead = [DeadLetter.model_validate_json(r.value) for r in letters]
    assert [(d.reason, d.source.offset) for d in dead] == [
        ("empty", 1), ("too_many_pixels", 3), ("bad_headers", 4), ("undecodable", 6)]
    assert dead[1].headers["frame_id"] == "bomb" and dead[1].key == "cam-1"
    assert all(dict(r.headers)["reason"] == d.reason.encode() for r, d in zip(letters, dead, strict=True))


def test_a_restarted_inspector_resumes_from_committed_offsets_and_loses_no_frame(
        kafka_broker, new_topic, published_model_dir):
    settings = service_settings(kafka_broker, new_topic(partitions=2), published_model_dir, queue_frames=8)
    first, second, third = raw_frames(30), raw_frames(30, start=30), raw_frames(20, start=60)
    everything = {f.frame_id for f in first + second + third}
    out = settings.output_topic

    async def frame_ids() -> list[str]:
        return [loads(r.value)["frame_id"] for r in await read_records(kafka_broker, out, 10**6, timeout_s=1.0)]

    async def scenario():
        async with running_service(settings):  # 1: a clean stop part-way through: drain, commit, leave
            produced = await produce(kafka_broker, settings.topic, first)
            await read_records(kafka_broker, out, 10)
        after_clean_stop = await frame_ids()
        committed = await committed_positions(kafka_broker, settings.topic, settings.group_id)
        produced += await produce(kafka_broker, settings.topic, second)
        async with running_service(settings) as run:  # 2: a crash part-way through: nothing more committed
            await read_records(kafka_broker, out, len(after_clean_stop) + 10)
            await run.crash()
        produced += await produce(kafka_broker, settings.topic, third)
        async with running_service(settings):  # 3: runs until every frame has its event
            await read_records(kafka_broker, out, 0,
                               until=lambda rs: {loads(r.value)["frame_id"] for r in rs} >= everything)
        await assert_all_committed(settings, produced)
        return after_clean_stop, committed, await frame_ids()

    after_clean_stop, committed, seen = asyncio.run(scenario())
    assert set(seen) == everything, f"lost frames: {sorted(everything - set(seen))}"
    # every event out before the clean stop had its frame committed, and nothing else was
    assert sum(offset or 0 for offset in committed.values()) == len(after_clean_stop)
    assert seen[:len(after_clean_stop)] == after_clean_stop
    # so the next run started exactly after them: none of those frames came out twice
    assert not set(after_clean_stop) & set(seen[len(after_clean_stop):])


def test_the_source_pauses_under_backpressure_and_still_delivers_everything(
        kafka_broker, new_topic, published_model_dir):
    settings = service_settings(kafka_broker, new_topic(partitions=2), published_model_dir, queue_frames=4,
                                max_batch=2)
    frames = raw_frames(40)

    async def scenario():
        with capture_logs() as logs:
            async with running_service(settings):
                await produce(kafka_broker, settings.topic, frames)
                records = await read_records(kafka_broker, settings.output_topic, len(frames))
        return records, logs

    records, logs = asyncio.run(scenario())
    assert sorted(loads(r.value)["frame_id"] for r in records) == sorted(f.frame_id for f in frames)
    assert any(entry["event"] == "backpressure_pause" for entry in logs)


def test_a_newer_published_model_is_swapped_in_between_batches(kafka_broker, new_topic, tmp_path):
    models = tmp_path / "models"
    export_untrained(models / "20250101T000000.000000Z-v1", "v1")
    settings = service_settings(kafka_broker, new_topic(partitions=1), models, model_poll_s=0.1)

    async def scenario():
        async with running_service(settings) as run:
            await produce(kafka_broker, settings.topic, raw_frames(4))
            await read_records(kafka_broker, settings.output_topic, 4)
            await asyncio.to_thread(export_untrained, models / "20250102T000000.000000Z-v2", "v2", seed=1)
            async with asyncio.timeout(20):
                while run.service.serving.version != "v2":
                    await asyncio.sleep(0.05)
            await produce(kafka_broker, settings.topic, raw_frames(4, start=4))
            return await read_records(kafka_broker, settings.output_topic, 8)

    versions = [loads(r.value)["model"]["version"] for r in asyncio.run(scenario())]
    assert versions == ["v1"] * 4 + ["v2"] * 4


def test_an_unreachable_broker_is_one_warning_then_quiet_retries_until_stopped(published_model_dir):
    settings = service_settings(f"127.0.0.1:{free_port()}", "frames", published_model_dir, connect_backoff_max_s=0.1)

    async def scenario(logs):
        stop = asyncio.Event()
        task = asyncio.create_task(build(settings).service.run(stop))
        async with asyncio.timeout(30):  # three retries take ~0.3 s on an idle machine, longer on a busy one
            while sum(entry["event"] == "kafka_retry" for entry in logs) < 3:
                await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 5.0)

    with capture_logs() as logs:
        asyncio.run(scenario(logs))
    events = Counter(entry["event"] for entry in logs)
    assert events["kafka_unreachable"] == 1
    assert events["kafka_retry"] >= 3


def test_a_rebalance_drains_and_commits_before_revoking_so_no_frame_is_lost_or_repeated(
        kafka_broker, new_topic, published_model_dir):
    settings = service_settings(kafka_broker, new_topic(partitions=4), published_model_dir)
    first, second = raw_frames(40, cameras=8), raw_frames(40, start=40, cameras=8)
    everything = {f.frame_id for f in first + second}
    out = settings.output_topic

    async def scenario():
        with capture_logs() as logs:
            async with running_service(settings):
                await produce(kafka_broker, settings.topic, first)
                await read_records(kafka_broker, out, 10)
                async with running_service(settings):  # a second member joins: partitions move
                    await produce(kafka_broker, settings.topic, second)
                    records = await read_records(
                        kafka_broker, out, 0, until=lambda rs: {loads(r.value)["frame_id"] for r in rs} >= everything)
        return [loads(r.value)["frame_id"] for r in records], logs

    seen, logs = asyncio.run(scenario())
    assert set(seen) == everything
    assert len(seen) == len(everything), f"repeated: {[k for k, n in Counter(seen).items() if n > 1]}"
    revoked = [entry for entry in logs if entry["event"] == "partitions_revoked" and entry["partitions"]]
    assert revoked and all(entry["drained"] for entry in revoked)


def test_two_inference_workers_deliver_every_frame_with_each_cameras_events_in_frame_order(
        kafka_broker, new_topic, published_model_dir):
    settings = service_settings(kafka_broker, new_topic(partitions=1), published_model_dir, inference_workers=2,
                                max_batch=2, max_wait_ms=0.0)
    frames = raw_frames(40, cameras=2)

    async def scenario():
        async with running_service(settings):
            produced = await produce(kafka_broker, settings.topic, frames)
            records = await read_records(kafka_broker, settings.output_topic, len(frames))
        await assert_all_committed(settings, produced)
        return records

    events = [loads(r.value) for r in asyncio.run(scenario())]
    assert sorted(e["frame_id"] for e in events) == [f.frame_id for f in frames]
    for camera in ("cam-0", "cam-1"):
        ids = [e["frame_id"] for e in events if e["camera_id"] == camera]
        assert ids == sorted(ids)
