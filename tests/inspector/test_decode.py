from datetime import UTC, datetime

import cv2
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


COLOUR = np.stack([IMAGE, IMAGE[::-1], 255 - IMAGE], axis=2)  # (120, 200, 3) RGB, every channel different


@pytest.mark.parametrize(("encoding", "ext"), [("png", ".png"), ("jpeg", ".jpg"), ("bmp", ".bmp")])
def test_colour_files_decode_to_the_models_colour(encoding, ext):
    """RGB for a colour model (in RGB order); for a gray model, OpenCV's gray decoder, as in training."""
    value = encode(ext, COLOUR[..., ::-1])  # OpenCV encodes BGR
    rgb = decode_frame(headers(encoding), value, LIMITS, "rgb")
    gray = decode_frame(headers(encoding), value, LIMITS, "gray")
    assert isinstance(rgb, Decoded) and isinstance(gray, Decoded)
    assert rgb.image.shape == (120, 200, 3) and gray.image.shape == (120, 200)
    np.testing.assert_array_equal(gray.image, cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_GRAYSCALE))
    if encoding != "jpeg":  # lossless
        np.testing.assert_array_equal(rgb.image, COLOUR)


@pytest.mark.parametrize("pixel_format", ["rgb8", "bgr8"])
def test_raw_colour_frames_follow_their_pixel_format(pixel_format):
    value = (COLOUR if pixel_format == "rgb8" else COLOUR[..., ::-1]).tobytes()
    meta = headers("raw", width=200, height=120, pixel_format=pixel_format)
    rgb = decode_frame(meta, value, LIMITS, "rgb")
    gray = decode_frame(meta, value, LIMITS, "gray")
    assert isinstance(rgb, Decoded) and isinstance(gray, Decoded)
    np.testing.assert_array_equal(rgb.image, COLOUR)
    np.testing.assert_array_equal(gray.image, cv2.cvtColor(COLOUR, cv2.COLOR_RGB2GRAY))
    short = decode_frame(meta, IMAGE.tobytes(), LIMITS, "rgb")  # gray8's byte count is a third of it
    assert isinstance(short, Rejected) and short.reason == "bad_dimensions" and pixel_format in short.detail


def test_gray_frames_stay_one_plane_and_limits_apply_to_colour_frames():
    gray = decode_frame(headers("raw", width=200, height=120), IMAGE.tobytes(), LIMITS, "rgb")
    assert isinstance(gray, Decoded) and gray.image.shape == (120, 200)  # replicated by the preprocessing
    assert gray.headers.pixel_format == "gray8"
    small = DecodeLimits(max_bytes=1 << 20, max_pixels=199 * 120)
    for meta, value in [(headers("raw", width=200, height=120, pixel_format="rgb8"), COLOUR.tobytes()),
                        (headers("png"), encode(".png", COLOUR))]:
        rejected = decode_frame(meta, value, small, "rgb")
        assert isinstance(rejected, Rejected) and rejected.reason == "too_many_pixels"
    too_big = decode_frame(headers("raw", width=200, height=120, pixel_format="rgb8"), COLOUR.tobytes(),
                           DecodeLimits(max_bytes=COLOUR.size - 1, max_pixels=1 << 20), "rgb")
    assert isinstance(too_big, Rejected) and too_big.reason == "too_large"
