"""Property-based fuzzing of the frame decoder (a pure function: no Kafka).

Whatever the headers and bytes, `decode_frame` returns a frame within the limits or a rejection with a
known reason — it never raises, never hands OpenCV an image above the pixel limit, and every rejection
makes a valid dead-letter record. FUZZ_EXAMPLES (default 200 per property) scales the search; 4,000 per
property found nothing either.
"""

from __future__ import annotations

import os
import struct
import typing
from datetime import UTC, datetime
from unittest import mock

import cv2
import numpy as np
from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspector import decode
from inspector.codec import dumps
from inspector.decode import SIZE_READERS, Decoded, DecodeLimits, Rejected, decode_frame
from inspector.outputs import dead_letter
from inspector.records import Record
from schemas.messages import DeadLetter, DeadLetterReason, FrameHeaders
from tests.helpers.poison import bmp_declaring, jpeg_declaring, png_header

REASONS = set(typing.get_args(DeadLetterReason))
LIMITS = DecodeLimits(max_bytes=64 * 1024, max_pixels=128 * 128)
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXT = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp"}
HEADER_NAMES = [*FrameHeaders.model_fields, "unknown", "Camera_Id"]


def valid_headers(encoding: str, **extra) -> list[tuple[str, bytes]]:
    return FrameHeaders(camera_id="cam", frame_id="f", captured_at=datetime.now(UTC), encoding=encoding,
                        **extra).to_kafka()


def check(headers: list[tuple[str, bytes]], value: bytes | None, limits: DecodeLimits = LIMITS) -> Decoded | Rejected:
    """Decode and hold the invariants every outcome must satisfy."""
    result = decode_frame(headers, value, limits)
    if isinstance(result, Rejected):
        assert result.reason in REASONS
        assert 0 < len(result.detail) <= 1000
        letter = dead_letter(Record(TopicPartition("frames", 0), 7, b"cam", value, tuple(headers),
                                    datetime.now(UTC), datetime.now(UTC)), result)
        DeadLetter.model_validate_json(dumps(letter))  # the sink can always publish it
    else:
        assert isinstance(result, Decoded)
        assert result.image.dtype == np.uint8 and result.image.ndim == 2
        assert 0 < result.image.size <= limits.max_pixels
        assert len(value) <= limits.max_bytes
        if result.headers.width is not None:
            assert result.image.shape == (result.headers.height, result.headers.width)
    return result


images = st.builds(
    lambda h, w, seed: np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8),
    st.integers(1, 64), st.integers(1, 64), st.integers(0, 2**32 - 1))
header_values = st.one_of(st.binary(max_size=64), st.sampled_from(
    [b"png", b"jpeg", b"bmp", b"raw", b"gif", b"1", b"2", b"0", b"-1", b"32", b"99999999999999999999",
     b"2025-03-01T12:00:00Z", b"2025-03-01T12:00:00", b"cam", b"\xff\xfe", b""]))


@FUZZ
@given(headers=st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_values), max_size=12),
       value=st.one_of(st.none(), st.binary(max_size=2048)))
def test_arbitrary_headers_and_bytes_never_raise(headers, value):
    check(headers, value)


@FUZZ
@given(image=images, encoding=st.sampled_from(["png", "jpeg", "bmp"]), data=st.data())
def test_mutated_images_never_raise_and_never_exceed_the_limits(image, encoding, data):
    ok, buf = cv2.imencode(EXT[encoding], image)
    assert ok
    value = bytearray(buf.tobytes())
    for _ in range(data.draw(st.integers(0, 4), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "splice"]), label="kind")
        i = data.draw(st.integers(0, max(len(value) - 1, 0)), label="at")
        if kind == "flip" and value:
            value[i] ^= data.draw(st.integers(1, 255), label="xor")
        elif kind == "cut":
            value = value[:i]
        elif kind == "insert":
            value[i:i] = data.draw(st.binary(min_size=1, max_size=32), label="inserted")
        else:
            value[i:i + 4] = struct.pack(">I", data.draw(st.integers(0, 2**32 - 1), label="word"))
    result = check(valid_headers(encoding), bytes(value))
    if isinstance(result, Decoded):  # whatever decoded matches the size the header bytes declare
        assert SIZE_READERS[encoding](bytes(value)) == (result.image.shape[1], result.image.shape[0])


@FUZZ
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["png", "jpeg", "bmp"]))
def test_declared_dimensions_above_the_limit_never_reach_opencv(width, height, kind):
    if kind == "jpeg":
        width, height = width % 65536, height % 65536
    value = {"png": lambda: png_header(width, height), "jpeg": lambda: jpeg_declaring(width, height),
             "bmp": lambda: bmp_declaring(width, height)}[kind]()
    with mock.patch.object(decode.cv2, "imdecode", side_effect=AssertionError("imdecode called")) as imdecode:
        if width * height > LIMITS.max_pixels:
            result = check(valid_headers(kind), value)
            assert result == Rejected("too_many_pixels", result.detail)
            imdecode.assert_not_called()


@FUZZ
@given(image=images, encoding=st.sampled_from(["png", "bmp", "raw"]))
def test_valid_lossless_frames_decode_to_their_exact_pixels(image, encoding):
    h, w = image.shape
    if encoding == "raw":
        headers, value = valid_headers("raw", width=w, height=h), image.tobytes()
    else:
        headers, value = valid_headers(encoding), cv2.imencode(EXT[encoding], image)[1].tobytes()
    result = check(headers, value)
    assert isinstance(result, Decoded), result
    np.testing.assert_array_equal(result.image, image)


@FUZZ
@given(image=images, limit=st.integers(1, 64 * 64))
def test_the_pixel_limit_holds_at_its_edge(image, limit):
    h, w = image.shape
    result = check(valid_headers("raw", width=w, height=h), image.tobytes(),
                   DecodeLimits(max_bytes=1 << 20, max_pixels=limit))
    assert isinstance(result, Decoded) == (h * w <= limit)
