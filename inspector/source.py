"""Consume and decode: the consumer, its group membership, backpressure, and decoding off the loop.

The source fetches only as many records as fit in the in-flight budget (`queue_frames`: fetched but
not yet committed); when the budget is spent it pauses its partitions, so the consumer stops
prefetching, and resumes once acknowledgements free room. Offsets are committed manually by the
commit policy (never auto-commit). Before partitions are revoked in a rebalance, the listener waits
for their in-flight frames to be acknowledged and commits them, so the next owner starts after them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from inspector.decode import Decoded, DecodeLimits, Rejected, decode_frame
from inspector.metrics import Metrics, with_thread_cpu_time
from inspector.offsets import CommitPolicy
from inspector.records import Frame, Record, from_kafka_ms, utc_now
from schemas.checkpoint import Color

FETCH_TIMEOUT_MS = 200
MAX_RECORDS = 500

OnFrame = Callable[[Frame], Awaitable[None]]
OnReject = Callable[[Record, Rejected], Awaitable[None]]


class DrainBeforeRevoke(ConsumerRebalanceListener):
    def __init__(self, offsets: CommitPolicy, metrics: Metrics, timeout_s: float) -> None:
        self._offsets, self._metrics, self._timeout_s = offsets, metrics, timeout_s
        self._log = structlog.get_logger(__name__)

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._metrics.group_joined(False)
        if not revoked:
            return
        in_flight = self._offsets.in_flight(revoked)
        drained = await self._offsets.drain(revoked, self._timeout_s)
        self._log.info("partitions_revoked", partitions=_names(revoked), in_flight=in_flight, drained=drained)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._metrics.group_joined(True)
        self._log.info("partitions_assigned", partitions=_names(assigned))


class FrameSource:
    """Owns a started consumer (subscribed with `DrainBeforeRevoke`) and the commit policy."""

    def __init__(self, consumer: AIOKafkaConsumer, offsets: CommitPolicy, *, limits: DecodeLimits,
                 capacity: int, metrics: Metrics, color: Callable[[], Color]) -> None:
        self._consumer, self.offsets, self._limits, self._color = consumer, offsets, limits, color
        self._capacity, self._metrics = capacity, metrics
        self._log = structlog.get_logger(__name__)

    async def run(self, on_frame: OnFrame, on_reject: OnReject, stop: asyncio.Event) -> None:
        """Fetch, decode and hand over frames until `stop` is set."""
        while not stop.is_set():
            room = self._capacity - self.offsets.in_flight()
            if room <= 0:
                self._pause()
                await self.offsets.wait_for_room(self._capacity, timeout_s=FETCH_TIMEOUT_MS / 1000)
                continue
            self._resume()
            fetched = await self._consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=min(room, MAX_RECORDS))
            if fetched:
                await self._handle(fetched, on_frame, on_reject)

    async def _handle(self, fetched: dict[TopicPartition, list[ConsumerRecord]], on_frame: OnFrame,
                      on_reject: OnReject) -> None:
        received_at = utc_now()
        records = []
        for tp, batch in fetched.items():
            self._metrics.frames_consumed(tp.topic, tp.partition, len(batch))
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                self._metrics.consumer_lag(tp.topic, tp.partition, max(highwater - batch[-1].offset - 1, 0))
            for r in batch:
                self.offsets.track(tp, r.offset)
                records.append(Record(tp, r.offset, r.key, r.value, tuple(r.headers or ()),
                                      from_kafka_ms(r.timestamp), received_at))
        decoded, cpu_s = await asyncio.to_thread(with_thread_cpu_time, _decode_all, records, self._limits,
                                                 self._color())
        self._metrics.decoded(cpu_s)
        for record, result in zip(records, decoded, strict=True):
            if isinstance(result, Rejected):
                await on_reject(record, result)
            else:
                await on_frame(Frame(record, result.headers, result.image))

    def _pause(self) -> None:
        assigned = self._consumer.assignment() - self._consumer.paused()
        if assigned:
            self._consumer.pause(*assigned)
            self._log.debug("backpressure_pause", partitions=_names(assigned), in_flight=self.offsets.in_flight())

    def _resume(self) -> None:
        paused = self._consumer.paused()
        if paused:
            self._consumer.resume(*paused)
            self._log.debug("backpressure_resume", partitions=_names(paused))


def _decode_all(records: Sequence[Record], limits: DecodeLimits, color: Color) -> list[Decoded | Rejected]:
    """Decoded to the colour of the model serving now (a model swapped in meanwhile gets `preprocess.to_color`)."""
    return [decode_frame(r.headers, r.value, limits, color, produced_at=r.broker_timestamp) for r in records]


def _names(tps: set[TopicPartition]) -> list[str]:
    return sorted(f"{tp.topic}/{tp.partition}" for tp in tps)
