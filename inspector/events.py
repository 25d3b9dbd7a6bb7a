"""Frames in flight, and the records the service writes about them: defect events and dead letters."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
from aiokafka import TopicPartition

from inspector.decode import Rejected
from schemas.checkpoint import Manifest
from schemas.messages import (
    Box, DeadLetter, DefectEvent, EventTimes, FrameHeaders, ModelRef, SourcePosition, event_id_for, known_headers,
)

if TYPE_CHECKING:
    from schemas.messages import Box as FrameBox


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
    def position(self) -> SourcePosition:
        return SourcePosition(topic=self.tp.topic, partition=self.tp.partition, offset=self.offset)


@dataclass(frozen=True)
class Frame:
    """A decoded frame waiting for inference."""

    record: Record
    headers: FrameHeaders
    image: np.ndarray  # (H, W) uint8


def defect_event(frame: Frame, probabilities: np.ndarray, manifest: Manifest, *, threshold: float,
                 inferred_at: datetime, boxes: tuple[FrameBox, ...] | None = None) -> DefectEvent:
    """The event for one frame; `probabilities` is that frame's row of the model's output."""
    best = int(np.argmax(probabilities))
    confidence = float(probabilities[best])
    headers, record = frame.headers, frame.record
    emitted_at = utc_now()
    return DefectEvent(
        event_id=event_id_for(headers.camera_id, headers.frame_id, manifest.model_version),
        frame_id=headers.frame_id,
        camera_id=headers.camera_id,
        coil_id=headers.coil_id,
        strip_offset_m=headers.strip_offset_m,
        source=record.position,
        label=manifest.class_names[best],
        confidence=min(confidence, 1.0),
        probabilities={name: float(p) for name, p in zip(manifest.class_names, probabilities, strict=True)},
        status="defect" if confidence >= threshold else "uncertain",
        model=ModelRef(name=manifest.model_name, version=manifest.model_version, sha256=manifest.weights_sha256),
        times=EventTimes(captured_at=headers.captured_at, produced_at=record.produced_at,
                         received_at=record.received_at, inferred_at=inferred_at, emitted_at=emitted_at),
        latency_ms=(emitted_at - headers.captured_at).total_seconds() * 1000,
        boxes=None if boxes is None else tuple(
            Box(x0=b.x0, y0=b.y0, x1=b.x1, y1=b.y1, score=min(max(b.score, 0.0), 1.0)) for b in boxes
        ),
    )


def dead_letter(record: Record, rejected: Rejected) -> DeadLetter:
    return DeadLetter(
        reason=rejected.reason,
        detail=rejected.detail,
        source=record.position,
        key=record.key.decode("utf-8", "replace")[:256] if record.key is not None else None,
        headers={name: value[:256] for name, value in known_headers(record.headers).items()},
        value_bytes=len(record.value or b""),
        received_at=record.received_at,
        dead_lettered_at=utc_now(),
    )
