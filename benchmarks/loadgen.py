"""Load for the service and console benchmarks: JPEG frames, a paced or closed-loop producer, an event reader.

The producer and the reader run in the benchmark's own event loop, on the same 2-core machine as the
broker and the system under test. A frame's latency is the moment the reader received its event minus
the moment the producer was handed the frame (both `time.perf_counter` in this process): camera to
downstream consumer, including the producer's linger, the broker both ways and the reader's fetch.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

NEU_CLS = Path(__file__).resolve().parents[1] / "../shared/datasets/neu-cls"
SIZE = 200
CAMERAS = 6


@dataclass(frozen=True)
class Frames:
    values: tuple[bytes, ...]  # JPEG bytes of 200×200 gray frames
    source: str


def load_frames(synthesized: int = 256, root: Path = NEU_CLS) -> Frames:
    """NEU-CLS's 1,620 JPEGs when the dataset is present at `root`, else `synthesized` generated 200×200 gray JPEGs."""
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        if files:
            values = tuple(p.read_bytes() for p in files)
            return Frames(values, f"NEU-CLS ({len(values)} JPEGs, mean {np.mean([len(v) for v in values]) / 1024:.1f} KiB)")
    rng = np.random.default_rng(0)
    values = []
    for _ in range(synthesized):
        coarse = rng.integers(60, 200, (SIZE // 8, SIZE // 8), dtype=np.uint8)
        image = cv2.resize(coarse, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        values.append(data.tobytes())
    return Frames(tuple(values), f"synthesized ({len(values)} gray JPEGs; NEU-CLS not found)")


def frame_headers(frame_id: str, camera_id: str) -> list[tuple[str, bytes]]:
    """The FrameHeaders contract as Kafka headers, captured now (built by hand: this is the hot loop)."""
    return [("schema_version", b"1"), ("camera_id", camera_id.encode()), ("frame_id", frame_id.encode()),
            ("captured_at", datetime.now(UTC).isoformat().encode()), ("encoding", b"jpeg")]


@dataclass
class Offered:
    """What one phase's producer sent: frame id → perf_counter at send, and the send window."""

    prefix: str
    sent: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.sent) / max(self.ended - self.started, 1e-9)


class EventReader:
    """Reads an output topic from its beginning and keeps, per frame id, when its first event arrived."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                          fetch_max_wait_ms=5, max_partition_fetch_bytes=4 * 1024 * 1024)
        self.received: dict[str, float] = {}
        self.per_prefix: Counter[str] = Counter()
        self.duplicates = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventReader:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
        await self._consumer.stop()

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=2000)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    frame_id = orjson.loads(record.value)["frame_id"]
                    if frame_id in self.received:
                        self.duplicates += 1
                        continue
                    self.received[frame_id] = now
                    self.per_prefix[frame_id.split("/", 1)[0]] += 1

    async def wait_for(self, offered: Offered, timeout_s: float, limit_s: float | None = None) -> bool:
        """Until every frame of `offered` has its event (True), or none of them came for `timeout_s` or `limit_s`
        passed (False): a backlog that still drains is waited for, up to the limit."""
        now = time.monotonic()
        stall, limit = now + timeout_s, now + (timeout_s if limit_s is None else limit_s)
        seen = self.per_prefix[offered.prefix]
        while seen < len(offered.sent):
            now = time.monotonic()
            if now > stall or now > limit:
                return False
            await asyncio.sleep(0.05)
            if self.per_prefix[offered.prefix] > seen:
                seen, stall = self.per_prefix[offered.prefix], time.monotonic() + timeout_s
        return True


class Load:
    """One producer that offers frames to a topic, spread over its partitions (camera k → partition k % P)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, frames: Frames) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                          max_batch_size=256 * 1024, max_request_size=4 * 1024 * 1024)
        self._topic, self._partitions, self._frames = topic, partitions, frames.values
        self._i = 0
        self._acks: list[asyncio.Future] = []

    async def __aenter__(self) -> Load:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def _send(self, offered: Offered) -> None:
        i, self._i = self._i, self._i + 1
        camera = i % CAMERAS
        frame_id = f"{offered.prefix}/{len(offered.sent):07d}"
        offered.sent[frame_id] = time.perf_counter()
        self._acks.append(await self._producer.send(
            self._topic, self._frames[i % len(self._frames)], key=f"cam-{camera}".encode(),
            partition=camera % self._partitions, headers=frame_headers(frame_id, f"cam-{camera}")))

    async def _settle(self) -> None:
        acks, self._acks = self._acks, []
        await asyncio.gather(*acks)

    async def fixed_rate(self, prefix: str, rate: float, seconds: float) -> Offered:
        """Offer `rate` frames/s for `seconds`, paced against the clock (see `paced`)."""
        offered = Offered(prefix)

        async def send() -> None:
            await self._send(offered)
            if len(self._acks) > 2000:
                await self._settle()

        offered.started, offered.ended = await paced(send, rate, int(rate * seconds))
        await self._settle()
        return offered

    async def closed_loop(self, prefix: str, seconds: float, outstanding: int, reader: EventReader) -> Offered:
        """Keep `outstanding` frames sent but not yet answered, for `seconds`: the system never waits for
        input, and the backlog (hence the latency) stays bounded."""
        offered = Offered(prefix)
        offered.started = time.perf_counter()
        end = offered.started + seconds
        while time.perf_counter() < end:
            room = outstanding - (len(offered.sent) - reader.per_prefix[prefix])
            for _ in range(min(room, 64)):
                await self._send(offered)
            await asyncio.sleep(0.002 if room < 64 else 0)
            if len(self._acks) > 2000:
                await self._settle()
        offered.ended = time.perf_counter()
        await self._settle()
        return offered


async def paced(send: Callable[[], Awaitable[object]], rate: float, total: int) -> tuple[float, float]:
    """Call `send` `total` times, `rate` times per second against the clock (a late tick sends what is due);
    the window's (start, end) in perf_counter seconds."""
    start = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            await send()
            sent += 1
        await asyncio.sleep(max(0.0, start + sent / rate - time.perf_counter()))
    return start, time.perf_counter()


def latencies(offered: Offered, reader: EventReader) -> np.ndarray:
    """Seconds from send to event, for the frames of `offered` that got one."""
    return np.asarray([reader.received[f] - t for f, t in offered.sent.items() if f in reader.received])


def delivered_rate(offered: Offered, reader: EventReader, ramp_s: float) -> float:
    """Events per second received during the send window, after the first `ramp_s` of it."""
    lo, hi = offered.started + ramp_s, offered.ended
    n = sum(1 for f in offered.sent if lo <= reader.received.get(f, -1.0) <= hi)
    return n / max(hi - lo, 1e-9)
