"""Frames in, records out: helpers for tests that run the inspector against the local broker.

    settings = service_settings(kafka_broker, new_topic(partitions=2), published_model_dir)
    async with running_service(settings) as run:
        await produce(settings.bootstrap_servers, settings.topic, raw_frames(10))
        events = await read_records(settings.bootstrap_servers, settings.output_topic, 10)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord, RecordMetadata

from inspector.app import Inspector, build
from inspector.metrics import Metrics
from inspector.service import InspectorService, Models
from inspector.settings import Settings
from inspector.topics import ensure_topics
from schemas.messages import FrameHeaders

FRAME_SIZE = 32  # the side of tiny_frame's frames, and of tests.helpers.models.TINY_INPUT


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topics(bootstrap: str, partitions: Mapping[str, int]) -> None:
    """Create topics (name -> partition count) on the broker; callable from sync tests and fixtures.
    From inside a running event loop, await `inspector.topics.ensure_topics` instead."""
    asyncio.run(ensure_topics(partitions, client_kwargs={"bootstrap_servers": bootstrap}))


@dataclass(frozen=True)
class Frame:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    frame_id: str


def service_settings(bootstrap: str, topic: str, model_dir: Path | None, **overrides) -> Settings:
    """Fast settings for tests: CPU, small batches, a quick group join (tansu waits session/2)."""
    doc = dict(
        bootstrap_servers=bootstrap, topic=topic, output_topic=f"{topic}.events", dead_letter_topic=f"{topic}.dlq",
        group_id=unique_name("g"), model_dir=model_dir, device="cpu", max_batch=4, max_wait_ms=5.0,
        session_timeout_ms=3000, heartbeat_interval_ms=500, model_poll_s=60.0, summary_interval_s=60.0,
        shutdown_timeout_s=5.0, connect_backoff_max_s=0.5,
    )
    return Settings(**(doc | overrides))


def encoded_frame(frame_id: str, value: bytes, encoding: str, camera_id: str = "cam-1", **headers) -> Frame:
    meta = FrameHeaders(camera_id=camera_id, frame_id=frame_id, captured_at=datetime.now(UTC), encoding=encoding,
                        **headers)
    return Frame(camera_id.encode(), value, meta.to_kafka(), frame_id)


def raw_frames(n: int, *, start: int = 0, cameras: int = 2, size: int = 64, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed + start)
    return [encoded_frame(f"f{i:05d}", rng.integers(0, 256, (size, size), dtype=np.uint8).tobytes(), "raw",
                          camera_id=f"cam-{i % cameras}", width=size, height=size)
            for i in range(start, start + n)]


def tiny_frame(frame_id: str, camera: int = 0, seed: int | None = None) -> Frame:
    """A valid raw FRAME_SIZE×FRAME_SIZE frame from camera `cam-<camera>`."""
    rng = np.random.default_rng(seed if seed is not None else zlib.crc32(frame_id.encode()))
    pixels = rng.integers(0, 256, (FRAME_SIZE, FRAME_SIZE), dtype=np.uint8).tobytes()
    return encoded_frame(frame_id, pixels, "raw", camera_id=f"cam-{camera}", width=FRAME_SIZE, height=FRAME_SIZE)


def image_frames(root: Path, paths: Sequence[Path], camera_id: str = "cam-1") -> list[Frame]:
    return [encoded_frame(p.relative_to(root).as_posix(), p.read_bytes(), "jpeg", camera_id=camera_id) for p in paths]


async def produce(bootstrap: str, topic: str, frames: Sequence[Frame]) -> list[RecordMetadata]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        acks = [await producer.send(topic, f.value, key=f.key, headers=f.headers) for f in frames]
        return list(await asyncio.gather(*acks))
    finally:
        await producer.stop()


async def read_records(bootstrap: str, topic: str, n: int, timeout_s: float = 30.0,
                       until: Callable[[list[ConsumerRecord]], bool] | None = None) -> list[ConsumerRecord]:
    """Records of `topic` from the beginning until `n` arrived (or `until(records)` holds), or the timeout."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not (until(records) if until else len(records) >= n):
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def committed_positions(bootstrap: str, topic: str, group_id: str) -> dict[int, int | None]:
    """partition -> committed offset of `group_id` (None if nothing committed); does not join the group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)}
    finally:
        await consumer.stop()


def end_positions(produced: Sequence[RecordMetadata]) -> dict[int, int]:
    """partition -> offset after the last produced record. (tansu 0.6 answers ListOffsets(latest) with
    the last batch's base offset + 1, so `end_offsets()` cannot be trusted there; the acks can.)"""
    ends: dict[int, int] = {}
    for md in produced:
        ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
    return ends


@dataclass
class Running:
    inspector: Inspector
    task: asyncio.Task[None]

    @property
    def service(self) -> InspectorService:
        return self.inspector.service

    async def crash(self) -> None:
        """Cancel the service outright: no drain, no final commit (clients still close)."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def running_service(settings: Settings, *, metrics: Metrics | None = None, models: Models | None = None,
                          ready_timeout_s: float = 30.0) -> AsyncIterator[Running]:
    """The inspector `build(settings)` assembles, serving in this event loop: joined to its group when the
    block starts, stopped (drained and committed) when it ends, unless the block crashed it. A test that
    wraps or replaces the model store passes it as `models` (built with the same `metrics`)."""
    await ensure_topics({settings.output_topic: 1, settings.dead_letter_topic: 1},
                        client_kwargs={"bootstrap_servers": settings.bootstrap_servers})
    inspector = build(settings, metrics=metrics, models=models)
    stop = asyncio.Event()
    task = asyncio.create_task(inspector.service.run(stop))
    try:
        async with asyncio.timeout(ready_timeout_s):
            while not inspector.metrics.health().group_joined:
                if task.done():
                    await task
                    raise RuntimeError("the service stopped before joining its group")
                await asyncio.sleep(0.02)
        yield Running(inspector, task)
    finally:
        stop.set()
        if not task.done():
            await asyncio.wait_for(task, settings.shutdown_timeout_s + 5)
