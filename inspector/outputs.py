"""What the service writes, built in one place: a defect event per frame, a dead letter per invalid record.

An `Output` is one Kafka record to produce (topic, key, JSON value, headers) together with the
message it carries and the input record whose offset it finishes once the broker acknowledges it.

An event's status (`decide`): "unknown" when the frame's unknown score exceeds the unknown threshold
(the operator's `ood_threshold`, else the one calibrated with the model), else "uncertain" when the
confidence is below its label's threshold (`class_thresholds`, else `confidence_threshold`), else "defect".
A score equal to its threshold is not unknown; a confidence equal to its threshold is a defect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from inspector.codec import dumps
from inspector.decode import Rejected
from inspector.records import Frame, Record, utc_now
from inspector.settings import Settings
from schemas.checkpoint import Manifest
from schemas.messages import (
    Box, DeadLetter, DefectEvent, EventStatus, EventTimes, ModelRef, event_id_for, known_headers,
)

JSON = ("content-type", b"application/json")


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    message: DefectEvent | DeadLetter
    source: Record


@dataclass(frozen=True)
class Thresholds:
    """The decision thresholds of the settings: a label's minimum confidence for "defect" (`per_class`, else
    `confidence`), and the unknown threshold that overrides the model's (`unknown`, None: the model's)."""

    confidence: float = 0.5
    per_class: Mapping[str, float] = field(default_factory=dict)
    unknown: float | None = None

    @classmethod
    def of(cls, settings: Settings) -> Thresholds:
        return cls(settings.confidence_threshold, dict(settings.class_thresholds), settings.ood_threshold)

    def unknown_for(self, manifest: Manifest) -> float | None:
        """The unknown threshold in force for `manifest`'s model; None when nothing can be unknown."""
        if manifest.ood is None:
            return None
        return self.unknown if self.unknown is not None else manifest.ood.threshold


def decide(label: str, confidence: float, ood_score: float | None, thresholds: Thresholds,
           unknown_threshold: float | None) -> EventStatus:
    """unknown if the score exceeds the unknown threshold, else uncertain below the label's threshold, else defect."""
    if ood_score is not None and unknown_threshold is not None and ood_score > unknown_threshold:
        return "unknown"
    return "uncertain" if confidence < thresholds.per_class.get(label, thresholds.confidence) else "defect"


class Outputs:
    """Builds the service's outputs with the topics and the decision thresholds of its settings."""

    def __init__(self, settings: Settings) -> None:
        self._events_topic, self._dead_letter_topic = settings.output_topic, settings.dead_letter_topic
        self._thresholds = Thresholds.of(settings)

    def events(self, frames: Sequence[Frame], probabilities: np.ndarray, boxes: Sequence[tuple[Box, ...]] | None,
               manifest: Manifest, inferred_at: datetime, ood_scores: np.ndarray | None = None) -> list[Output]:
        """One event per frame of a batch; row i of `probabilities` (and `boxes[i]`, `ood_scores[i]`) belongs to
        frame i."""
        per_frame = boxes if boxes is not None else [None] * len(frames)
        scores = ood_scores if ood_scores is not None else [None] * len(frames)
        out = []
        for frame, probs, frame_boxes, score in zip(frames, probabilities, per_frame, scores, strict=True):
            event = defect_event(frame, probs, manifest, thresholds=self._thresholds, inferred_at=inferred_at,
                                 boxes=frame_boxes, ood_score=None if score is None else float(score))
            headers = [("schema_version", str(event.schema_version).encode()), JSON]
            out.append(Output(self._events_topic, event.camera_id.encode(), dumps(event), headers, event,
                              frame.record))
        return out

    def dead_letter(self, record: Record, rejected: Rejected) -> Output:
        letter = dead_letter(record, rejected)
        headers = [("schema_version", str(letter.schema_version).encode()), ("reason", rejected.reason.encode()),
                   JSON]
        return Output(self._dead_letter_topic, record.key, dumps(letter), headers, letter, record)


def defect_event(frame: Frame, probabilities: np.ndarray, manifest: Manifest, *, thresholds: Thresholds,
                 inferred_at: datetime, boxes: tuple[Box, ...] | None = None,
                 ood_score: float | None = None) -> DefectEvent:
    """The event for one frame; `probabilities` is that frame's row of the model's output, `ood_score` its
    unknown score (None without a detector)."""
    best = int(np.argmax(probabilities))
    confidence, label = float(probabilities[best]), manifest.class_names[best]
    unknown_threshold = thresholds.unknown_for(manifest)
    headers, record = frame.headers, frame.record
    emitted_at = utc_now()
    return DefectEvent(
        event_id=event_id_for(headers.camera_id, headers.frame_id, manifest.model_version),
        frame_id=headers.frame_id,
        camera_id=headers.camera_id,
        coil_id=headers.coil_id,
        strip_offset_m=headers.strip_offset_m,
        source=record.position,
        label=label,
        confidence=min(confidence, 1.0),
        probabilities={name: float(p) for name, p in zip(manifest.class_names, probabilities, strict=True)},
        status=decide(label, confidence, ood_score, thresholds, unknown_threshold),
        ood_score=ood_score,
        model=ModelRef(name=manifest.model_name, version=manifest.model_version, sha256=manifest.weights_sha256,
                       ood_threshold=unknown_threshold),
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
