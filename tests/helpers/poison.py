"""Generated poison frames: every way a record can be unusable, each with the dead-letter reason it must get.

`poison(n, rng)` cycles through the kinds below, varying sizes, cut points and values with `rng`. The
decompression bomb is a real PNG (6000×6000 of zeros, 36 Mpx, ~36 KB after zlib) above the pixel limit;
"declares_huge" PNG/JPEG/BMP are a few hundred bytes whose headers claim 60000×60000 or more.
"""

from __future__ import annotations

import functools
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from tests.helpers.streams import Frame, encoded_frame

MAX_FRAME_BYTES = 64 * 1024
MAX_PIXELS = 4096 * 4096
IMAGE = np.random.default_rng(7).integers(0, 256, (32, 32), dtype=np.uint8)


@dataclass(frozen=True)
class Poison:
    kind: str
    reason: str  # the DeadLetterReason it must get
    frame: Frame


def encode(ext: str, image: np.ndarray = IMAGE) -> bytes:
    """`image` in the format of extension `ext` (".png", ".jpg", ".bmp")."""
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring width×height, and no pixel data at all."""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


@functools.cache
def png_bomb(side: int = 6000) -> bytes:
    """A complete, valid gray PNG of side×side zeros: tiny on the wire, `side`² bytes once decoded."""
    rows = zlib.compress(bytes(side * (side + 1)), 9)
    return png_header(side, side) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(".jpg"))
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):  # walk to the start-of-frame segment
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(".bmp"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def corrupt_png(rng: random.Random) -> bytes:
    """A byte of the compressed pixel data changed: the chunk's CRC no longer matches."""
    data = bytearray(encode(".png"))
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8:start - 4])[0]
    i = start + rng.randrange(length)
    data[i] ^= rng.randrange(1, 256)
    return bytes(data)


def frame(frame_id: str, value: bytes | None, encoding: str = "png", **headers) -> Frame:
    return encoded_frame(frame_id, value, encoding, camera_id="cam-p", **headers)


def headers_without(frame_id: str, *names: str, **replace: bytes) -> list[tuple[str, bytes]]:
    base = frame(frame_id, b"", "png").headers
    return [(k, replace.get(k, v)) for k, v in base if k not in names]


def truncated(ext: str, encoding: str) -> Callable[[str, random.Random], Frame]:
    def make(fid: str, rng: random.Random) -> Frame:
        data = encode(ext)
        return frame(fid, data[:rng.randrange(1, len(data))], encoding)
    return make


KINDS: dict[str, tuple[str, Callable[[str, random.Random], Frame]]] = {
    "empty_value": ("empty", lambda fid, rng: frame(fid, b"")),
    "tombstone": ("empty", lambda fid, rng: frame(fid, None)),
    "zero_bytes": ("undecodable", lambda fid, rng: frame(fid, bytes(rng.randrange(1, 5000)),
                                                          rng.choice(["png", "jpeg", "bmp"]))),
    "random_bytes": ("undecodable", lambda fid, rng: frame(fid, b"?" + rng.randbytes(rng.randrange(0, 5000)),
                                                            rng.choice(["png", "jpeg", "bmp"]))),
    "truncated_png": ("undecodable", truncated(".png", "png")),
    "truncated_jpeg": ("undecodable", truncated(".jpg", "jpeg")),
    "truncated_bmp": ("undecodable", truncated(".bmp", "bmp")),
    "corrupt_png": ("undecodable", lambda fid, rng: frame(fid, corrupt_png(rng))),
    "encoding_mismatch": ("undecodable", lambda fid, rng: frame(fid, encode(".png"), "jpeg")),
    "declares_huge_png": ("too_many_pixels", lambda fid, rng: frame(
        fid, png_header(rng.randrange(60000, 2**31), rng.randrange(60000, 2**31)))),
    "declares_huge_jpeg": ("too_many_pixels", lambda fid, rng: frame(
        fid, jpeg_declaring(rng.randrange(60000, 65536), rng.randrange(60000, 65536)), "jpeg")),
    "declares_huge_bmp": ("too_many_pixels", lambda fid, rng: frame(
        fid, bmp_declaring(rng.randrange(60000, 2**31), rng.randrange(60000, 2**31)), "bmp")),
    "decompression_bomb": ("too_many_pixels", lambda fid, rng: frame(fid, png_bomb())),
    "too_large": ("too_large", lambda fid, rng: frame(fid, rng.randbytes(MAX_FRAME_BYTES + rng.randrange(1, 4096)))),
    "no_headers": ("bad_headers", lambda fid, rng: Frame(b"cam-p", encode(".png"), [], fid)),
    "no_camera_id": ("bad_headers", lambda fid, rng: Frame(
        b"cam-p", encode(".png"), headers_without(fid, "camera_id"), fid)),
    "bad_captured_at": ("bad_headers", lambda fid, rng: Frame(
        b"cam-p", encode(".png"), headers_without(fid, captured_at=rng.choice([b"yesterday", b"", b"2025-13-01"])),
        fid)),
    "naive_captured_at": ("bad_headers", lambda fid, rng: Frame(
        b"cam-p", encode(".png"), headers_without(fid, captured_at=b"2025-03-01T12:00:00"), fid)),
    "unknown_encoding": ("bad_headers", lambda fid, rng: Frame(
        b"cam-p", encode(".png"), headers_without(fid, encoding=rng.choice([b"gif", b"webp", b"tiff", b"", b"PNG"])),
        fid)),
    "wrong_schema_version": ("bad_headers", lambda fid, rng: Frame(
        b"cam-p", encode(".png"), headers_without(fid, schema_version=rng.choice([b"2", b"0", b"v1", b"99"])), fid)),
    "oversized_header": ("bad_headers", lambda fid, rng: Frame(
        b"cam-p", encode(".png"), headers_without(fid, camera_id=b"c" * rng.randrange(129, 5000)), fid)),
    "raw_without_size": ("bad_headers", lambda fid, rng: Frame(
        b"cam-p", IMAGE.tobytes(), headers_without(fid, encoding=b"raw"), fid)),
    "nonpositive_size": ("bad_headers", lambda fid, rng: Frame(
        b"cam-p", IMAGE.tobytes(),
        [*headers_without(fid, encoding=b"raw"), ("width", rng.choice([b"0", b"-32", b"thirty-two"])), ("height", b"32")],
        fid)),
    "raw_wrong_length": ("bad_dimensions", lambda fid, rng: frame(
        fid, IMAGE.tobytes()[:rng.randrange(1, 1024)], "raw", width=32, height=32)),
    "raw_declares_huge": ("bad_dimensions", lambda fid, rng: frame(
        fid, IMAGE.tobytes(), "raw", width=60000, height=60000)),
    "header_size_disagrees": ("bad_dimensions", lambda fid, rng: frame(fid, encode(".png"), width=64, height=32)),
    # issue 13
    "non_utf8_header": ("bad_headers", lambda fid, rng: Frame(
        b"cam-p", encode(".png"),
        headers_without(fid, camera_id=b"cam-" + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"])), fid)),
    "duplicate_header": ("duplicate_headers", lambda fid, rng: Frame(
        b"cam-p", encode(".png"), [*headers_without(fid), (rng.choice(["camera_id", "frame_id", "encoding"]), b"x")],
        fid)),
    "captured_at_far_off": ("clock_skew", lambda fid, rng: Frame(
        b"cam-p", encode(".png"), headers_without(fid, captured_at=rng.choice(
            [b"9999-12-31T23:59:59Z", b"0001-01-01T00:00:00Z", b"1970-01-01T00:00:00Z"])), fid)),
    "non_finite_offset": ("bad_headers", lambda fid, rng: Frame(
        b"cam-p", encode(".png"),
        [*headers_without(fid), ("strip_offset_m", rng.choice([b"nan", b"inf", b"-Infinity", b"1e999"]))], fid)),
}


def tiff_orientation(orientation: int) -> bytes:
    """A big-endian TIFF block holding one tag, EXIF Orientation (0x0112): what JPEG's APP1 and PNG's eXIf carry."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + entry + struct.pack(">I", 0)


def with_orientation(data: bytes, encoding: str, orientation: int = 6) -> bytes:
    """JPEG or PNG bytes with an EXIF orientation tag (6: rotate 90° clockwise to display), as cameras write it."""
    tiff = tiff_orientation(orientation)
    if encoding == "jpeg":
        app1 = b"Exif\x00\x00" + tiff
        return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    end_of_ihdr = 8 + 25
    return data[:end_of_ihdr] + png_chunk(b"eXIf", tiff) + data[end_of_ihdr:]


def poison(n: int, rng: random.Random) -> list[Poison]:
    kinds = list(KINDS.items())
    out = []
    for i in range(n):
        kind, (reason, make) = kinds[i % len(kinds)]
        out.append(Poison(kind, reason, make(f"poison-{i:05d}-{kind}", rng)))
    return out


def valid(n: int) -> list[Frame]:
    """Good frames in every encoding."""
    encodings = [("raw", None), ("png", ".png"), ("jpeg", ".jpg"), ("bmp", ".bmp")]
    out = []
    for i in range(n):
        encoding, ext = encodings[i % len(encodings)]
        image = np.roll(IMAGE, i, axis=1)
        value = image.tobytes() if ext is None else encode(ext, image)
        size = {"width": 32, "height": 32} if encoding == "raw" else {}
        out.append(encoded_frame(f"good-{i:05d}", value, encoding, camera_id=f"cam-{i % 3}", **size))
    return out
