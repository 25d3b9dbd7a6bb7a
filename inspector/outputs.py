"""What the service writes, built in one place: a defect event per frame, a dead letter per invalid record.

An `Output` is one Kafka record to produce (topic, key, JSON value, headers) together with the
message it carries and the input record whose offset it finishes once the broker acknowledges it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from inspector.codec import dumps
from inspector.decode import Rejected
from inspector.records import Frame, Record, utc_now
from inspector.settings import Settings
from schemas.checkpoint import Manifest
from schemas.messages import Box, DeadLetter, DefectEvent, EventTimes, ModelRef, event_id_for, known_headers

JSON = ("content-type", b"application/json")


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    message: DefectEvent | DeadLetter
    source: Record


class Outputs:
    """Builds the service's outputs with the topics and the confidence threshold of its settings."""

    def __init__(self, settings: Settings) -> None:
        self._events_topic, self._dead_letter_topic = settings.output_topic, settings.dead_letter_topic
        self._threshold = settings.confidence_threshold

    def events(self, frames: Sequence[Frame], probabilities: np.ndarray, boxes: Sequence[tuple[Box, ...]] | None,
               manifest: Manifest, inferred_at: datetime) -> list[Output]:
        """One event per frame of a batch; row i of `probabilities` (and `boxes[i]`) belongs to frame i."""
        per_frame = boxes if boxes is not None else [None] * len(frames)
        out = []
        for frame, probs, frame_boxes in zip(frames, probabilities, per_frame, strict=True):
            event = defect_event(frame, probs, manifest, threshold=self._threshold, inferred_at=inferred_at,
                                 boxes=frame_boxes)
            headers = [("schema_version", str(event.schema_version).encode()), JSON]
            out.append(Output(self._events_topic, event.camera_id.encode(), dumps(event), headers, event,
                              frame.record))
        return out

    def dead_letter(self, record: Record, rejected: Rejected) -> Output:
        letter = dead_letter(record, rejected)
        headers = [("schema_version", str(letter.schema_version).encode()), ("reason", rejected.reason.encode()),
                   JSON]
        return Output(self._dead_letter_topic, record.key, dumps(letter), headers, letter, record)


def defect_event(frame: Frame, probabilities: np.ndarray, manifest: Manifest, *, threshold: float,
                 inferred_at: datetime, boxes: tuple[Box, ...] | None = None) -> DefectEvent:
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
        boxes=boxes,
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
