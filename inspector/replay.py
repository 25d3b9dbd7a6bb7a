"""Publish a folder of images as a camera would: one record per file, in path order.

Value = the file's bytes (PNG, JPEG or BMP as stored; other files are skipped), key = the camera id,
headers = `FrameHeaders` with frame_id = the path relative to the folder and captured_at = now.
`rate` paces the frames (frames per second); without it they go as fast as the broker takes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from schemas.messages import Encoding, FrameHeaders

SUFFIX_ENCODING: dict[str, Encoding] = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp"}


@dataclass(frozen=True)
class ReplayStats:
    frames: int
    skipped: int
    seconds: float


def frame_files(root: Path) -> tuple[list[Path], int]:
    """Image files under `root` in path order, and how many other files were skipped."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in SUFFIX_ENCODING]
    return images, len(files) - len(images)


async def replay(root: Path, *, topic: str, camera_id: str, client_kwargs: Mapping[str, Any],
                 rate: float | None = None, limit: int | None = None, coil_id: str | None = None) -> ReplayStats:
    files, skipped = frame_files(root)
    files = files[:limit] if limit is not None else files
    producer = AIOKafkaProducer(acks="all", linger_ms=5, **client_kwargs)
    await producer.start()
    started = time.monotonic()
    try:
        acks = []
        for i, path in enumerate(files):
            if rate:
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            data = await asyncio.to_thread(path.read_bytes)
            headers = FrameHeaders(camera_id=camera_id, frame_id=path.relative_to(root).as_posix(),
                                   captured_at=datetime.now(UTC), encoding=SUFFIX_ENCODING[path.suffix.lower()],
                                   coil_id=coil_id)
            acks.append(await producer.send(topic, data, key=camera_id.encode(), headers=headers.to_kafka()))
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    return ReplayStats(frames=len(files), skipped=skipped, seconds=time.monotonic() - started)
