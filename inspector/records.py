"""What the service reads: a fetched Kafka record, and a decoded frame waiting for inference."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from aiokafka import TopicPartition

from schemas.messages import FrameHeaders, SourcePosition


def utc_now() -> datetime:
    return datetime.now(UTC)


def from_kafka_ms(timestamp_ms: int) -> datetime:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC)


@dataclass(frozen=True)
class Record:
    """What the source keeps of a fetched Kafka record."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    produced_at: datetime
    received_at: datetime

    @property
    def broker_timestamp(self) -> datetime | None:
        """`produced_at`, or None when the broker gave no timestamp (Kafka's -1)."""
        return self.produced_at if self.produced_at.timestamp() >= 0 else None

    @property
    def position(self) -> SourcePosition:
        return SourcePosition(topic=self.tp.topic, partition=self.tp.partition, offset=self.offset)


@dataclass(frozen=True)
class Frame:
    """A decoded frame waiting for inference."""

    record: Record
    headers: FrameHeaders
    image: np.ndarray  # (H, W) gray or (H, W, 3) RGB uint8, in the serving model's colour when decoded
