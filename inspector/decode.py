"""Kafka record → validated 8-bit image in the serving model's colour, or the reason it goes to the dead-letter topic.

Checks run cheapest first: the value's size, the headers, then the image's declared dimensions
read from the PNG/JPEG/BMP header bytes (or the raw headers). Only a frame whose declared pixel
count is within the limit is handed to OpenCV, so a small file that declares a huge image (a
decompression bomb) never gets a buffer allocated. Encoded images are decoded straight to the model's
colour (OpenCV's gray decoder for a gray model, exactly as in training; RGB for a colour model); raw
frames are read as their `pixel_format` says and converted. This is CPU work: call it from a worker thread.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import cv2
import numpy as np
from pydantic import ValidationError

from schemas.checkpoint import Color
from schemas.messages import BYTES_PER_PIXEL, DeadLetterReason, FrameHeaders, HeaderError
from stripnet.preprocess import to_color

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI, EOI


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int
    max_pixels: int
    max_clock_skew_s: float | None = None  # captured_at vs the broker's timestamp; None: not checked


@dataclass(frozen=True)
class Decoded:
    headers: FrameHeaders
    image: np.ndarray  # (H, W) gray or (H, W, 3) RGB uint8


@dataclass(frozen=True)
class Rejected:
    reason: DeadLetterReason
    detail: str


class _Reject(Exception):
    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def decode_frame(headers: Sequence[tuple[str, bytes]], value: bytes | None, limits: DecodeLimits,
                 color: Color = "gray", *, produced_at: datetime | None = None) -> Decoded | Rejected:
    """`produced_at`: the record's broker timestamp, which `captured_at` must lie within
    `limits.max_clock_skew_s` of (a camera clock set to a wrong date would give absurd times and latencies)."""
    try:
        return _decode(headers, value, limits, color, produced_at)
    except _Reject as rej:
        return Rejected(rej.reason, rej.detail[:1000])


def _decode(headers: Sequence[tuple[str, bytes]], value: bytes | None, limits: DecodeLimits, color: Color,
            produced_at: datetime | None) -> Decoded:
    if not value:
        raise _Reject("empty", "the record has no value")
    if len(value) > limits.max_bytes:
        raise _Reject("too_large", f"{len(value)} bytes > limit {limits.max_bytes}")
    meta = _parse_headers(headers)
    _check_clock(meta, produced_at, limits.max_clock_skew_s)
    width, height = _declared_size(meta, value)
    if width * height > limits.max_pixels:
        raise _Reject("too_many_pixels", f"{width}×{height} = {width * height} pixels > limit {limits.max_pixels}")
    if meta.width is not None and meta.height is not None and (meta.width, meta.height) != (width, height):
        raise _Reject("bad_dimensions", f"headers say {meta.width}×{meta.height}, the image is {width}×{height}")
    image = _pixels(meta, value, width, height, color)
    return Decoded(meta, image)


def _parse_headers(headers: Sequence[tuple[str, bytes]]) -> FrameHeaders:
    try:
        return FrameHeaders.from_kafka(headers)
    except HeaderError as err:
        raise _Reject(err.reason, str(err)) from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'headers'}: {e['msg']}" for e in err.errors())
        raise _Reject("bad_headers", problems) from None


def _check_clock(meta: FrameHeaders, produced_at: datetime | None, max_skew_s: float | None) -> None:
    if produced_at is None or max_skew_s is None:
        return
    skew_s = (meta.captured_at - produced_at).total_seconds()
    if abs(skew_s) > max_skew_s:
        raise _Reject("clock_skew", f"captured_at {meta.captured_at.isoformat()} is {skew_s:+.0f} s from the broker "
                                     f"timestamp {produced_at.isoformat()}; the limit is ±{max_skew_s:g} s")


def _declared_size(meta: FrameHeaders, value: bytes) -> tuple[int, int]:
    """(width, height) the bytes declare, read without decoding pixels."""
    if meta.encoding == "raw":
        assert meta.width is not None and meta.height is not None  # FrameHeaders guarantees it
        needed = meta.width * meta.height * BYTES_PER_PIXEL[meta.pixel_format]
        if len(value) != needed:
            raise _Reject("bad_dimensions", f"raw {meta.pixel_format} {meta.width}×{meta.height} needs {needed} "
                                            f"bytes, got {len(value)}")
        return meta.width, meta.height
    size = SIZE_READERS[meta.encoding](value)
    if size is None:
        raise _Reject("undecodable", f"not a valid {meta.encoding.upper()} header")
    width, height = size
    if width <= 0 or height <= 0:
        raise _Reject("bad_dimensions", f"{meta.encoding.upper()} header declares {width}×{height}")
    return width, height


def _pixels(meta: FrameHeaders, value: bytes, width: int, height: int, color: Color) -> np.ndarray:
    buffer = np.frombuffer(value, dtype=np.uint8)
    if meta.encoding == "raw":
        if meta.pixel_format == "gray8":
            return buffer.reshape(height, width).copy()
        image = buffer.reshape(height, width, 3)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if meta.pixel_format == "bgr8" else image.copy()
        return to_color(image, color)
    # the camera's pixel order is the truth: an EXIF orientation tag (JPEG, PNG) must not rotate the frame
    mode = cv2.IMREAD_GRAYSCALE if color == "gray" else cv2.IMREAD_COLOR
    image = cv2.imdecode(buffer, mode | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise _Reject("undecodable", f"OpenCV cannot decode this {meta.encoding.upper()} data")
    if image.shape[:2] != (height, width):
        decoded = f"{image.shape[1]}×{image.shape[0]}"
        raise _Reject("bad_dimensions", f"header declares {width}×{height}, decoded {decoded}")
    return image if color == "gray" else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# -- image header readers: (width, height) or None if the bytes are not that format ---------------

def png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 26 or not data.startswith(b"BM"):
        return None
    (dib_size,) = struct.unpack("<I", data[14:18])
    if dib_size == 12:  # BITMAPCOREHEADER: unsigned 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)  # negative height = rows stored top-down


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the marker segments up to the first start-of-frame; None if there is none before the scan."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in JPEG_NO_LENGTH:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in JPEG_SOF:
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


SIZE_READERS = {"png": png_size, "jpeg": jpeg_size, "bmp": bmp_size}
