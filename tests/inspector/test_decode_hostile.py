"""Frames an adversary or a careless camera sends (issue 13, items 5 and 8): EXIF orientation tags, headers that
are not UTF-8 or come twice, captured_at far from the broker's clock, non-finite numbers; and event ids that no
choice of ids can make collide."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import cv2
import numpy as np
import pytest
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from inspector.decode import Decoded, DecodeLimits, Rejected, decode_frame
from inspector.outputs import dead_letter
from inspector.records import Record, from_kafka_ms
from schemas.messages import DeadLetter, FrameHeaders, event_id_for
from tests.helpers.poison import encode, with_orientation

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LIMITS = DecodeLimits(max_bytes=1 << 20, max_pixels=1 << 20, max_clock_skew_s=3600)
WIDE = (np.arange(200 * 300) % 251).astype(np.uint8).reshape(200, 300)  # H 200, W 300: a landscape frame
SQUARE = (np.arange(100 * 100) * 7 % 253).astype(np.uint8).reshape(100, 100)
EXT = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp"}


def headers(encoding: str = "png", captured_at: datetime = NOW, **extra) -> list[tuple[str, bytes]]:
    return FrameHeaders(camera_id="cam", frame_id="f1", captured_at=captured_at, encoding=encoding,
                        **extra).to_kafka()


def decode(hdrs, value, color="gray", produced_at=NOW) -> Decoded | Rejected:
    return decode_frame(hdrs, value, LIMITS, color, produced_at=produced_at)


def rejected(result, reason: str) -> str:
    assert isinstance(result, Rejected) and result.reason == reason, result
    return result.detail


# -- orientation: the camera's pixel order is the truth ------------------------------------------------------

@pytest.mark.parametrize("color", ["gray", "rgb"])
@pytest.mark.parametrize("image", [WIDE, SQUARE], ids=["300x200", "100x100"])
@pytest.mark.parametrize("encoding", ["jpeg", "png"])
def test_an_exif_orientation_tag_does_not_rotate_the_frame(encoding, image, color):
    plain = encode(EXT[encoding], image)
    tagged = with_orientation(plain, encoding, 6)
    mode = cv2.IMREAD_GRAYSCALE if color == "gray" else cv2.IMREAD_COLOR
    assert cv2.imdecode(np.frombuffer(tagged, np.uint8), mode).shape[:2] == image.shape[::-1]  # OpenCV's default

    result = decode(headers(encoding), tagged, color)

    assert isinstance(result, Decoded), result
    assert result.image.shape[:2] == image.shape
    expected = decode(headers(encoding), plain, color)
    np.testing.assert_array_equal(result.image, expected.image)
    if encoding == "png" and color == "gray":
        np.testing.assert_array_equal(result.image, image)


@pytest.mark.parametrize("encoding", ["bmp", "raw"])
def test_formats_without_orientation_metadata_keep_their_pixel_order(encoding):
    """BMP carries no EXIF and raw frames no metadata at all: their pixels come out in the order they went in."""
    if encoding == "raw":
        result = decode(headers("raw", width=300, height=200), WIDE.tobytes())
    else:
        result = decode(headers("bmp"), encode(".bmp", WIDE))
    np.testing.assert_array_equal(result.image, WIDE)


# -- headers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["camera_id", "frame_id", "captured_at", "encoding", "coil_id"])
@pytest.mark.parametrize("bad", [b"\xff", b"cam-\xc3", b"\xed\xa0\x80", b"\xc0\xaf"], ids=repr)
def test_a_header_that_is_not_utf8_is_a_dead_letter(name, bad):
    hdrs = [(k, v) for k, v in headers(coil_id="coil-1") if k != name] + [(name, bad)]
    assert f"header {name!r} is not UTF-8" in rejected(decode(hdrs, encode(".png", SQUARE)), "bad_headers")


def test_two_cameras_whose_ids_differ_only_in_invalid_bytes_are_not_merged():
    """Decoding with U+FFFD made b"cam\\xff" and b"cam\\xfe" the same camera "cam\ufffd"."""
    for camera in (b"cam\xff", b"cam\xfe"):
        hdrs = [(k, camera if k == "camera_id" else v) for k, v in headers()]
        rejected(decode(hdrs, encode(".png", SQUARE)), "bad_headers")


def test_unknown_headers_may_be_anything():
    hdrs = headers() + [("traceparent", b"\xff\x00\xfe"), ("x-dup", b"a"), ("x-dup", b"b"), ("x-none", None)]
    assert isinstance(decode(hdrs, encode(".png", SQUARE)), Decoded)


@pytest.mark.parametrize("name", sorted(FrameHeaders.model_fields))
def test_a_frame_header_that_comes_twice_is_a_dead_letter(name):
    first = dict(headers("raw", width=100, height=100, coil_id="c", strip_offset_m=1.5)) | {"pixel_format": b"gray8"}
    hdrs = list(first.items()) + [(name, first[name])]  # even the same value twice
    detail = rejected(decode(hdrs, SQUARE.tobytes()), "duplicate_headers")
    assert name in detail


def test_a_dead_letter_of_each_new_reason_validates():
    for hdrs, reason in ((headers() * 2, "duplicate_headers"), (headers(captured_at=NOW.replace(year=9999)),
                                                                "clock_skew")):
        result = decode(hdrs, encode(".png", SQUARE))
        record = Record(TopicPartition("frames", 0), 3, b"cam", b"x", tuple(hdrs), NOW, NOW)
        letter = dead_letter(record, result)
        assert DeadLetter.model_validate_json(letter.model_dump_json()).reason == reason


# -- captured_at against the broker's clock ------------------------------------------------------------------

@pytest.mark.parametrize("captured_at", [datetime(9999, 12, 31, 23, 59, tzinfo=UTC), datetime(1, 1, 1, tzinfo=UTC),
                                         datetime(1970, 1, 1, tzinfo=UTC), NOW + timedelta(seconds=3601),
                                         NOW - timedelta(seconds=3601)], ids=str)
def test_captured_at_far_from_the_broker_timestamp_is_a_dead_letter(captured_at):
    detail = rejected(decode(headers(captured_at=captured_at), encode(".png", SQUARE)), "clock_skew")
    assert "the limit is ±3600 s" in detail


@pytest.mark.parametrize("offset_s", [-3600, -1, 0, 1, 3600])
def test_captured_at_within_the_window_is_served(offset_s):
    at = NOW + timedelta(seconds=offset_s)
    assert isinstance(decode(headers(captured_at=at), encode(".png", SQUARE)), Decoded)


def test_without_a_broker_timestamp_the_window_is_not_checked():
    record = Record(TopicPartition("frames", 0), 0, None, b"", (), from_kafka_ms(-1), NOW)
    assert record.broker_timestamp is None
    assert Record(TopicPartition("frames", 0), 0, None, b"", (), NOW, NOW).broker_timestamp == NOW
    far = headers(captured_at=datetime(1, 1, 1, tzinfo=UTC))
    assert isinstance(decode(far, encode(".png", SQUARE), produced_at=None), Decoded)
    assert isinstance(decode_frame(far, encode(".png", SQUARE), DecodeLimits(1 << 20, 1 << 20),
                                   produced_at=NOW), Decoded)  # no window set (the console's decoding)


# -- numbers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [b"nan", b"NaN", b"inf", b"-inf", b"Infinity", b"1e999", b"-1e400"])
def test_a_non_finite_strip_offset_is_a_dead_letter(text):
    hdrs = headers() + [("strip_offset_m", text)]
    assert "strip_offset_m" in rejected(decode(hdrs, encode(".png", SQUARE)), "bad_headers")


def test_a_finite_strip_offset_is_kept():
    result = decode(headers() + [("strip_offset_m", b"-12.5e2")], encode(".png", SQUARE))
    assert result.headers.strip_offset_m == -1250.0


# -- event ids -----------------------------------------------------------------------------------------------

def test_ids_containing_the_old_separator_no_longer_collide():
    assert event_id_for("a\x1fb", "c", "v1") != event_id_for("a", "b\x1fc", "v1")
    assert event_id_for("a", "b\x1fc", "v1") != event_id_for("a", "b", "c\x1fv1")
    assert event_id_for("1:a,", "b", "v") != event_id_for("1", "a,b", "v")  # the new encoding's own characters


def test_the_event_id_is_uuid5_of_three_netstrings():
    import uuid

    from schemas.messages import EVENT_ID_NAMESPACE
    assert event_id_for("cam-é", "f", "v1") == uuid.uuid5(EVENT_ID_NAMESPACE, "6:cam-é,1:f,2:v1,")


@given(a=st.tuples(st.text(), st.text(), st.text()), b=st.tuples(st.text(), st.text(), st.text()))
def test_different_triples_give_different_ids(a, b):
    if a != b:
        assert event_id_for(*a) != event_id_for(*b)
