"""Outputs: defect events and dead letters through one producer (acks=all), and the commit they unlock.

A frame's offset is finished only when the broker has acknowledged its event or dead letter; the
commit policy then commits the finished prefix (offset + 1 per partition). Sending never waits for
acknowledgements — a settle task per batch does — so inference keeps going while the broker confirms.
A failed send is fatal (`failure()` raises): the frames stay uncommitted and a restart re-reads them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog
from aiokafka import AIOKafkaProducer

from inspector.codec import dumps
from inspector.decode import Rejected
from inspector.events import Frame, Record, dead_letter
from inspector.offsets import CommitPolicy
from inspector.telemetry import NullTelemetry, Telemetry
from schemas.messages import DefectEvent

JSON_HEADERS = [("content-type", b"application/json")]


class SinkError(RuntimeError):
    pass


class Sink:
    def __init__(self, producer: AIOKafkaProducer, offsets: CommitPolicy, *, output_topic: str,
                 dead_letter_topic: str, telemetry: Telemetry = NullTelemetry()) -> None:
        self._producer, self._offsets, self._telemetry = producer, offsets, telemetry
        self.output_topic, self.dead_letter_topic = output_topic, dead_letter_topic
        self._settling: set[asyncio.Task[None]] = set()
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._log = structlog.get_logger(__name__)

    async def publish_events(self, frames: Sequence[Frame], events: Sequence[DefectEvent]) -> None:
        """Hand one batch's events to the producer; their offsets finish when all are acknowledged."""
        acks = []
        for frame, event in zip(frames, events, strict=True):
            headers = [("schema_version", str(event.schema_version).encode()), *JSON_HEADERS]
            acks.append(await self._producer.send(
                self.output_topic, dumps(event), key=event.camera_id.encode(), headers=headers))
            self._telemetry.event_latency((event.times.emitted_at - event.times.produced_at).total_seconds())
        self._settle(acks, [frame.record for frame in frames], lambda: self._telemetry.events_produced(len(acks)))

    async def publish_dead_letter(self, record: Record, rejected: Rejected) -> None:
        letter = dead_letter(record, rejected)
        self._log.info("dead_letter", topic=record.tp.topic, partition=record.tp.partition, offset=record.offset,
                       reason=rejected.reason, detail=rejected.detail)
        headers = [("schema_version", str(letter.schema_version).encode()), ("reason", rejected.reason.encode()),
                   *JSON_HEADERS]
        ack = await self._producer.send(self.dead_letter_topic, dumps(letter), key=record.key, headers=headers)
        self._settle([ack], [record], lambda: self._telemetry.dead_lettered(rejected.reason))

    def _settle(self, acks: list[asyncio.Future], records: list[Record], on_acked) -> None:
        task = asyncio.create_task(self._await_acks(acks, records, on_acked))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _await_acks(self, acks: list[asyncio.Future], records: list[Record], on_acked) -> None:
        try:
            await asyncio.gather(*acks)
        except Exception as err:  # noqa: BLE001 - any send failure stops the service, reported once
            if not self._failure.done():
                first = records[0]
                self._failure.set_exception(SinkError(
                    f"producing to Kafka failed ({type(err).__name__}: {err}); the frames from "
                    f"{first.tp.topic}/{first.tp.partition}@{first.offset} on stay uncommitted"))
            return
        on_acked()
        await self._offsets.acknowledged((r.tp, r.offset) for r in records)

    async def failure(self) -> None:
        """Wait forever, or raise SinkError as soon as a send fails."""
        await self._failure

    def pending(self) -> int:
        return len(self._settling)

    async def flush(self) -> None:
        """Wait until every handed-over output is acknowledged and its offsets are committed."""
        await self._producer.flush()
        while self._settling:
            await asyncio.gather(*list(self._settling))
        if self._failure.done():
            await self._failure
