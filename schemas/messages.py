"""The stream contracts: frame headers in, defect events and dead-letter records out.

A frame is one Kafka record: the value is the image bytes (PNG, JPEG, BMP, or raw row-major pixels:
`width`×`height` bytes of 8-bit gray, or ×3 of interleaved RGB or BGR, as `pixel_format` says); the key is the camera id, so each camera's frames stay in
order within a partition; the metadata travels as Kafka headers whose names are the field names
of `FrameHeaders` and whose values are UTF-8 text. Defect events and dead-letter records are
JSON objects (one per Kafka record) described by `DefectEvent` and `DeadLetter`.

Every model carries a `schema_version`; a consumer should reject versions it does not know.
JSON Schema files generated from these models live in `schemas/json/` (`make schemas`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

FRAME_SCHEMA_VERSION = 1
EVENT_SCHEMA_VERSION = 3  # 2: status "unknown", ood_score, model.ood_threshold; 3: new event ids (event_id_for)
DEAD_LETTER_SCHEMA_VERSION = 2  # 2: reasons duplicate_headers and clock_skew

Encoding = Literal["png", "jpeg", "bmp", "raw"]
EventStatus = Literal["defect", "uncertain", "unknown"]
PixelFormat = Literal["gray8", "rgb8", "bgr8"]
BYTES_PER_PIXEL: dict[str, int] = {"gray8": 1, "rgb8": 3, "bgr8": 3}

# Fixed namespace for event ids: uuid5 of the three netstrings of camera_id, frame_id, model_version (event_id_for).
EVENT_ID_NAMESPACE = uuid.UUID("5c1d0b7e-3f0a-4d55-9a1e-2f4b8f6d3c21")


def _int_text(value: object) -> object:
    return int(value) if isinstance(value, str) and value.isdecimal() else value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FrameHeaders(_Frozen):
    """Kafka headers of a frame record (header name = field name, value = UTF-8 text)."""

    schema_version: Annotated[Literal[1], BeforeValidator(_int_text)] = FRAME_SCHEMA_VERSION
    camera_id: str = Field(min_length=1, max_length=128)
    frame_id: str = Field(min_length=1, max_length=512, description="unique per camera, e.g. a counter or a file path")
    captured_at: AwareDatetime = Field(description="ISO 8601 with a UTC offset, e.g. 2025-03-01T12:00:00.123Z")
    encoding: Encoding
    pixel_format: PixelFormat = Field(default="gray8", description="layout of raw frames: 8-bit gray, or 8-bit "
                                      "interleaved RGB or BGR; encoded images carry their own (ignored for them)")
    width: int | None = Field(default=None, gt=0, description="required for raw; checked against the image otherwise")
    height: int | None = Field(default=None, gt=0, description="required for raw; checked against the image otherwise")
    coil_id: str | None = Field(default=None, max_length=128)
    strip_offset_m: float | None = Field(default=None, allow_inf_nan=False,
                                         description="position along the coil, metres from its head (finite)")

    @model_validator(mode="after")
    def _raw_needs_size(self) -> FrameHeaders:
        if self.encoding == "raw" and (self.width is None or self.height is None):
            raise ValueError("raw frames need width and height headers")
        return self

    def to_kafka(self) -> list[tuple[str, bytes]]:
        """Headers for `AIOKafkaProducer.send(headers=...)`; optional fields left at their default are left out."""
        doc = {"schema_version": self.schema_version} | self.model_dump(mode="json", exclude_defaults=True)
        return [(name, str(value).encode()) for name, value in doc.items()]

    @classmethod
    def from_kafka(cls, headers: Iterable[tuple[str, bytes]]) -> FrameHeaders:
        """Validate a record's headers; unknown header names are ignored, not rejected. A frame header must
        come once and be valid UTF-8: HeaderError otherwise (two values, or U+FFFD in place of bytes, could
        make two cameras one)."""
        found: dict[str, str] = {}
        for name, value in headers:
            if name not in cls.model_fields or value is None:
                continue
            if name in found:
                raise HeaderError("duplicate_headers", f"header {name!r} appears more than once")
            try:
                found[name] = value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise HeaderError("bad_headers", f"header {name!r} is not UTF-8 ({err.reason} at byte {err.start})")
        return cls.model_validate(found)


class HeaderError(ValueError):
    """Frame headers that are not a valid set before any field is read: `reason` is their dead-letter reason."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def known_headers(headers: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    """The frame headers among a record's headers as text, for a dead letter's report: invalid UTF-8 shows as
    U+FFFD, and of a repeated header the last value is kept."""
    names = FrameHeaders.model_fields.keys()
    return {name: value.decode("utf-8", "replace") for name, value in headers if name in names and value is not None}


class SourcePosition(_Frozen):
    """Where a frame came from: enough to fetch the record again."""

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class ModelRef(_Frozen):
    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    ood_threshold: float | None = Field(default=None, description="the unknown threshold applied (the model's "
                                        "calibrated one, or the operator's override); None: no unknown detector")


class EventTimes(_Frozen):
    captured_at: AwareDatetime = Field(description="from the frame's captured_at header (camera clock)")
    produced_at: AwareDatetime = Field(description="the frame record's Kafka timestamp")
    received_at: AwareDatetime = Field(description="the inspector fetched the record")
    inferred_at: AwareDatetime = Field(description="the model's output was ready")
    emitted_at: AwareDatetime = Field(description="the event was handed to the producer")


class Box(_Frozen):
    """A region of the frame in pixels of the frame as received, half-open: x0 <= x < x1, y0 <= y < y1."""

    x0: int = Field(ge=0)
    y0: int = Field(ge=0)
    x1: int = Field(gt=0)
    y1: int = Field(gt=0)
    score: float = Field(ge=0.0, le=1.0, description="the box's confidence, 0..1: the localization head's centre "
                         "probability, or for a model without a head the class activation inside the box")


class DefectEvent(_Frozen):
    """One per frame. Consumers deduplicate on `event_id` (at-least-once delivery)."""

    schema_version: Literal[3] = EVENT_SCHEMA_VERSION
    event_id: uuid.UUID = Field(description="uuid5 of camera_id, frame_id and model version: see event_id_for")
    frame_id: str
    camera_id: str
    coil_id: str | None = None
    strip_offset_m: float | None = None
    source: SourcePosition
    label: str
    confidence: float = Field(ge=0.0, le=1.0, description="probability of `label`")
    probabilities: dict[str, float] = Field(description="class name -> probability; sums to 1")
    status: EventStatus = Field(description="unknown when ood_score > model.ood_threshold (unlike the images the "
                                "model learned), else uncertain when confidence < the label's threshold, else defect")
    ood_score: float | None = Field(default=None, description="the model's unknown score: the higher, the less the "
                                    "frame's features are like those of the images the model learned (compare with "
                                    "model.ood_threshold, on the same scale); None when the model has no detector")
    model: ModelRef
    times: EventTimes
    latency_ms: float = Field(description="emitted_at - captured_at; negative only if the camera clock runs ahead")
    boxes: tuple[Box, ...] | None = Field(default=None, description="class-activation regions when --locate is on")


DeadLetterReason = Literal[
    "empty", "too_large", "bad_headers", "duplicate_headers", "clock_skew", "bad_dimensions", "too_many_pixels",
    "undecodable",
]


class DeadLetter(_Frozen):
    """A frame the inspector could not use. Its offset is still committed; the frame stays in `source`."""

    schema_version: Literal[2] = DEAD_LETTER_SCHEMA_VERSION
    reason: DeadLetterReason
    detail: str = Field(max_length=1000)
    source: SourcePosition
    key: str | None = Field(default=None, description="the frame record's key (camera id), UTF-8 decoded")
    headers: dict[str, str] = Field(default_factory=dict, description="the frame headers that were present")
    value_bytes: int = Field(ge=0, description="size of the frame record's value")
    received_at: AwareDatetime
    dead_lettered_at: AwareDatetime


def event_id_for(camera_id: str, frame_id: str, model_version: str) -> uuid.UUID:
    """Deterministic event id. The Kafka position is deliberately not part of it: a frame that a camera
    re-sends (a producer retry lands at a new offset) or that the inspector re-processes after a crash
    gets the same id, so a downstream consumer drops the duplicate; a new model version gives new ids.

    The name hashed is the three values as netstrings, `<UTF-8 byte length>:<value>,` each, so no choice of
    ids can make two different triples hash the same name (schema 3; before it the values were joined by
    \x1f, and camera "a\x1fb" + frame "c" collided with camera "a" + frame "b\x1fc")."""
    name = "".join(f"{len(value.encode())}:{value}," for value in (camera_id, frame_id, model_version))
    return uuid.uuid5(EVENT_ID_NAMESPACE, name)

