import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.messages import FrameHeaders, event_id_for

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def test_headers_round_trip_through_kafka_header_bytes():
    headers = FrameHeaders(camera_id="cam-1", frame_id="coil7/0001.png", captured_at=NOW, encoding="raw",
                           width=640, height=480, coil_id="C7", strip_offset_m=12.5)
    wire = headers.to_kafka()
    assert all(isinstance(name, str) and isinstance(value, bytes) for name, value in wire)
    assert FrameHeaders.from_kafka(wire + [("traceparent", b"00-abc")]) == headers


def test_optional_headers_are_left_off_the_wire():
    wire = FrameHeaders(camera_id="c", frame_id="f", captured_at=NOW, encoding="png").to_kafka()
    assert {name for name, _ in wire} == {"schema_version", "camera_id", "frame_id", "captured_at", "encoding"}


@pytest.mark.parametrize("bad", [
    {"encoding": "raw"},                              # raw without width/height
    {"encoding": "gif"},
    {"captured_at": "2025-03-01T12:00:00"},           # no UTC offset
    {"schema_version": "2"},
    {"camera_id": ""},
])
def test_invalid_headers_are_rejected(bad):
    doc = {"camera_id": "c", "frame_id": "f", "captured_at": NOW.isoformat(), "encoding": "png"} | bad
    with pytest.raises(ValidationError):
        FrameHeaders.from_kafka([(k, v.encode()) for k, v in doc.items()])


def test_event_id_depends_on_frame_identity_and_model_version_only():
    a = event_id_for("cam-1", "f1", "v1")
    assert a == event_id_for("cam-1", "f1", "v1")
    assert isinstance(a, uuid.UUID) and a.version == 5
    assert len({a, event_id_for("cam-2", "f1", "v1"), event_id_for("cam-1", "f2", "v1"),
                event_id_for("cam-1", "f1", "v2")}) == 4
