from datetime import UTC, datetime

import numpy as np
import pytest

from inspector.decode import Decoded, DecodeLimits, Rejected, bmp_size, decode_frame, jpeg_size, png_size
from schemas.messages import FrameHeaders
from tests.helpers.poison import encode, png_header

LIMITS = DecodeLimits(max_bytes=1 << 20, max_pixels=1 << 20)
IMAGE = (np.arange(120 * 200) % 251).astype(np.uint8).reshape(120, 200)  # H=120, W=200


def headers(encoding: str, **extra) -> list[tuple[str, bytes]]:
    return FrameHeaders(camera_id="cam", frame_id="f1", captured_at=datetime.now(UTC), encoding=encoding,
                        **extra).to_kafka()


def replaced(hdrs: list[tuple[str, bytes]], name: str, value: bytes) -> list[tuple[str, bytes]]:
    return [(k, value if k == name else v) for k, v in hdrs]


def encoded(ext: str) -> bytes:
    return encode(ext, IMAGE)


@pytest.mark.parametrize(("encoding", "ext"), [("png", ".png"), ("jpeg", ".jpg"), ("bmp", ".bmp")])
def test_encoded_frames_decode_to_gray_with_their_size(encoding, ext):
    result = decode_frame(headers(encoding), encoded(ext), LIMITS)
    assert isinstance(result, Decoded)
    assert result.image.dtype == np.uint8 and result.image.shape == (120, 200)
    if encoding != "jpeg":  # lossless
        np.testing.assert_array_equal(result.image, IMAGE)


def test_raw_frames_use_width_and_height_headers():
    result = decode_frame(headers("raw", width=200, height=120), IMAGE.tobytes(), LIMITS)
    assert isinstance(result, Decoded)
    np.testing.assert_array_equal(result.image, IMAGE)


@pytest.mark.parametrize(("reader", "ext"), [(png_size, ".png"), (jpeg_size, ".jpg"), (bmp_size, ".bmp")])
def test_header_readers_report_width_and_height_without_decoding(reader, ext):
    assert reader(encoded(ext)) == (200, 120)
    assert reader(b"not an image at all") is None


def test_a_decompression_bomb_is_rejected_from_its_header_alone():
    bomb = png_header(100_000, 100_000)
    assert len(bomb) < 64
    result = decode_frame(headers("png"), bomb, LIMITS)
    assert result == Rejected("too_many_pixels", result.detail) and "100000×100000" in result.detail


@pytest.mark.parametrize(("make", "reason"), [
    (lambda: (headers("png"), b""), "empty"),
    (lambda: (headers("png"), b"\0" * ((1 << 20) + 1)), "too_large"),
    (lambda: ([("camera_id", b"cam")], encoded(".png")), "bad_headers"),
    (lambda: (replaced(headers("png"), "encoding", b"gif"), encoded(".png")), "bad_headers"),
    (lambda: (headers("raw", width=200, height=121), IMAGE.tobytes()), "bad_dimensions"),
    (lambda: (headers("png", width=100, height=120), encoded(".png")), "bad_dimensions"),
    (lambda: (headers("jpeg"), encoded(".png")), "undecodable"),
    (lambda: (headers("png"), b"garbage bytes"), "undecodable"),
    (lambda: (headers("png"), encoded(".png")[:200]), "undecodable"),
    (lambda: (headers("jpeg"), encoded(".jpg")[:300]), "undecodable"),
])
def test_invalid_frames_become_rejections_with_a_reason(make, reason):
    hdrs, value = make()
    result = decode_frame(hdrs, value, LIMITS)
    assert isinstance(result, Rejected), result
    assert result.reason == reason and result.detail
