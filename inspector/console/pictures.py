"""Frame pictures for the cards, fetched from the frames topic by an event's `source` position.

Events stay small: they carry where their frame is, not the frame. One consumer without a group seeks
to each wanted position and asks for little (FETCH_BYTES: Kafka still returns a larger record batch whole,
so any frame comes back, without megabytes of the frames after it); the result is cached, least recently
used first out, within `max_bytes`.
Concurrent requests for the same frame share one fetch. The console never decodes a compressed frame:
its headers are validated against the frame contract, PNG, JPEG and BMP frames go to the browser as they
are (with their own content type and `nosniff`), and raw frames, checked against their declared size and
`max_pixels`, are encoded as PNG. (It stays clear of inspector.decode, which brings the model's torch.)
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, OffsetOutOfRangeError
from pydantic import ValidationError

from schemas.messages import BYTES_PER_PIXEL, FrameHeaders, SourcePosition

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "bmp": "image/bmp"}
FETCH_BYTES = 64 * 1024


def picture_path(source: SourcePosition) -> str:
    """The console's URL path of a frame's picture (the server routes `/frames/{topic}/{partition}/{offset}`)."""
    return f"/frames/{quote(source.topic, safe='')}/{source.partition}/{source.offset}"


@dataclass(frozen=True)
class Picture:
    content_type: str
    body: bytes


class PictureError(Exception):
    """Why a picture cannot be shown; `status` is the HTTP status that says so."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class PictureCache:
    def __init__(self, max_bytes: int, max_pixels: int, timeout_s: float, max_record_bytes: int) -> None:
        self._max_bytes, self._max_pixels, self._timeout_s = max_bytes, max_pixels, timeout_s
        self._max_record_bytes = max_record_bytes
        self._cache: OrderedDict[SourcePosition, Picture] = OrderedDict()
        self._bytes = 0
        self._pending: dict[SourcePosition, asyncio.Task[Picture]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()  # one seek at a time on the one consumer
        self.hits = self.fetches = 0

    @staticmethod
    def consumer_factory(client_kwargs: dict[str, Any]) -> Callable[[], AIOKafkaConsumer]:
        return lambda: AIOKafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="none",
                                        max_partition_fetch_bytes=FETCH_BYTES, fetch_max_bytes=FETCH_BYTES,
                                        **client_kwargs)

    def attach(self, consumer: AIOKafkaConsumer | None) -> None:
        """The started consumer to fetch with (None: not connected, pictures answer 503)."""
        self._consumer = consumer

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    async def get(self, source: SourcePosition) -> Picture:
        picture = self._cache.get(source)
        if picture is not None:
            self._cache.move_to_end(source)
            self.hits += 1
            return picture
        task = self._pending.get(source)
        if task is None:
            task = asyncio.create_task(self._fetch(source))
            self._pending[source] = task
            task.add_done_callback(lambda _: self._pending.pop(source, None))
        return await asyncio.shield(task)

    async def _fetch(self, source: SourcePosition) -> Picture:
        record = await self._record(source)
        picture = await asyncio.to_thread(self._render, record.headers, record.value)
        self._keep(source, picture)
        return picture

    async def _record(self, source: SourcePosition) -> Any:
        consumer = self._consumer
        if consumer is None:
            raise PictureError(503, "not connected to Kafka")
        tp = TopicPartition(source.topic, source.partition)
        async with self._lock:
            self.fetches += 1
            if consumer.assignment() != {tp}:
                consumer.assign([tp])
            consumer.seek(tp, source.offset)
            try:
                async with asyncio.timeout(self._timeout_s):
                    while True:
                        records = (await consumer.getmany(tp, timeout_ms=500, max_records=1)).get(tp, [])
                        if records:
                            break
            except OffsetOutOfRangeError:
                raise PictureError(404, "the frame is no longer in its topic") from None
            except TimeoutError:
                raise PictureError(504, f"no frame at that position within {self._timeout_s:g}s") from None
            except KafkaError as err:
                raise PictureError(503, f"Kafka: {type(err).__name__}") from None
        if records[0].offset != source.offset:
            raise PictureError(404, "no frame at that position")
        return records[0]

    def _render(self, headers: Any, value: bytes | None) -> Picture:
        try:
            meta = FrameHeaders.from_kafka(headers)
        except ValidationError:
            raise PictureError(422, "the frame's headers are not valid") from None
        if not value:
            raise PictureError(422, "the frame is empty")
        if len(value) > self._max_record_bytes:
            raise PictureError(422, f"a frame of {len(value)} bytes is not shown (limit {self._max_record_bytes})")
        if meta.encoding != "raw":
            return Picture(CONTENT_TYPES[meta.encoding], value)
        return Picture("image/png", self._raw_png(meta, value))

    def _raw_png(self, meta: FrameHeaders, value: bytes) -> bytes:
        assert meta.width is not None and meta.height is not None  # FrameHeaders requires them for raw
        channels = BYTES_PER_PIXEL[meta.pixel_format]
        if meta.width * meta.height > self._max_pixels or len(value) != meta.width * meta.height * channels:
            raise PictureError(422, f"a raw {meta.width}×{meta.height} {meta.pixel_format} frame of {len(value)} "
                                    f"bytes is not shown (limit {self._max_pixels} pixels)")
        shape = (meta.height, meta.width) if channels == 1 else (meta.height, meta.width, channels)
        image = np.frombuffer(value, np.uint8).reshape(shape)
        if meta.pixel_format == "rgb8":
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
        ok, png = cv2.imencode(".png", image)
        if not ok:
            raise PictureError(422, "cannot encode the raw frame as PNG")
        return png.tobytes()

    def _keep(self, source: SourcePosition, picture: Picture) -> None:
        if len(picture.body) > self._max_bytes:
            return
        self._cache[source] = picture
        self._bytes += len(picture.body)
        while self._bytes > self._max_bytes:
            _, dropped = self._cache.popitem(last=False)
            self._bytes -= len(dropped.body)
