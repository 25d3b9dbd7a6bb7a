"""Overload: offer about 3× the measured capacity for a bounded time. The inspector's memory stays within
what its settings allow (in-flight frames and the consumer's fetch buffers, not the backlog), the lag
grows while the offer lasts and then drains, and every frame gets exactly one event.

Scale: 200×200 gray JPEG frames (the NEU geometry; synthetic textures of about 4.1 KB, 40 KB decoded) and a
200×200-input model in `inspector run` (eager torch, one thread, one inference worker: a capacity this test's
one Python producer can offer well above on any host; with onnxruntime and two workers an AVX2 host served
1,329 frames/s and the producer reached only 1,840), max_batch 16, queue_frames 128, max_frame_bytes
64 KiB. The offer lasts
RELIABILITY_OVERLOAD_S seconds (6 by default to keep `make test` short; docs/reliability.md also
reports a 30 s run).
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.helpers.harness import InspectorProcess, Tail, peak_rss_bytes, record_figures
from tests.helpers.streams import create_topics, encoded_frame, service_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

OFFER_S = float(os.environ.get("RELIABILITY_OVERLOAD_S", "6"))
SIDE = 200
PARTITIONS = 2
MAX_BATCH = 16
QUEUE_FRAMES = 128
MAX_FRAME_BYTES = 64 * 1024
CALIBRATION_FRAMES = 1000
SLACK_BYTES = 32 * 2**20  # allocator and interpreter noise (the runs here grew 2-6 MiB in all)


def memory_bound(partitions: int) -> int:
    """Growth the settings allow over the steady-state peak: the in-flight budget (each frame's record, at
    most max_frame_bytes, and its decoded image) and one fetch buffer per partition
    (max_partition_fetch_bytes is max(max_frame_bytes + 64 KiB, 1 MiB) in service.py), plus slack."""
    in_flight = QUEUE_FRAMES * (MAX_FRAME_BYTES + SIDE * SIDE)
    fetch = partitions * max(MAX_FRAME_BYTES + 64 * 1024, 2**20)
    return in_flight + fetch + SLACK_BYTES


def textures(n: int) -> list[bytes]:
    """JPEG-encoded 200×200 gray textures, a little noisy, like a strip surface (quality 75: ~4.1 KB, which
    keeps the memory-only broker's load moderate; it stopped serving a partition after ~700 MB)."""
    import cv2

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    out = []
    for k in range(n):
        surface = 128 + 40 * np.sin(x / (5 + k)) * np.cos(y / (9 + k)) + rng.normal(0, 4, (SIDE, SIDE))
        image = np.clip(surface, 0, 255).astype(np.uint8)
        out.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 75])[1].tobytes())
    return out


class Offer:
    """Sends 200×200 JPEG frames at `rate` per second (from a small pool of textures)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        self._topic = topic
        self._pool = textures(16)
        self.wire_bytes = sum(map(len, self._pool)) / len(self._pool)
        self.sent: list[str] = []
        self.acked: dict[int, int] = {}  # partition -> offset after the last acknowledged record

    async def __aenter__(self) -> Offer:
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._producer.stop()

    async def send(self, n: int, rate: float | None = None) -> float:
        """Send `n` frames (paced at `rate`, or as fast as possible); the seconds it took."""
        started, acks, first = time.monotonic(), [], len(self.sent)
        for i in range(n):
            if rate is not None and i % 8 == 0:
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            frame_id = f"o{first + i:06d}"
            frame = encoded_frame(frame_id, self._pool[i % len(self._pool)], "jpeg", camera_id=f"cam-{i % 4}")
            self.sent.append(frame_id)
            ack = await self._producer.send(self._topic, frame.value, key=frame.key, headers=frame.headers)
            ack.add_done_callback(self._on_ack)
            acks.append(ack)
        await asyncio.gather(*acks)
        return time.monotonic() - started

    def _on_ack(self, ack: asyncio.Future) -> None:
        if not ack.cancelled() and ack.exception() is None:
            md = ack.result()
            self.acked[md.partition] = max(self.acked.get(md.partition, 0), md.offset + 1)


async def group_lag(consumer: AIOKafkaConsumer, topic: str, offer: Offer) -> int:
    """Records acknowledged to the producer and not yet committed by the inspector's group."""
    lag = 0
    for partition, end in offer.acked.items():
        lag += end - (await consumer.committed(TopicPartition(topic, partition)) or 0)
    return lag


def test_three_times_capacity_keeps_memory_bounded_and_the_lag_drains(kafka_broker, new_topic, published_model_dir,
                                                                       tmp_path):
    settings = service_settings(kafka_broker, new_topic(partitions=PARTITIONS), published_model_dir,
                                max_batch=MAX_BATCH, queue_frames=QUEUE_FRAMES, max_frame_bytes=MAX_FRAME_BYTES,
                                max_wait_ms=10.0, backend="torch", inference_workers=1)
    create_topics(kafka_broker, {settings.output_topic: 1, settings.dead_letter_topic: 1})
    bound = memory_bound(PARTITIONS)

    async def scenario():
        process = InspectorProcess(settings, tmp_path).start()
        try:
            await process.wait_for_log("partitions_assigned", timeout_s=120)
            ps = psutil.Process(process.pid)
            async with (Tail(kafka_broker, settings.output_topic) as tail, Offer(kafka_broker, settings.topic) as offer,
                        AIOKafkaConsumer(bootstrap_servers=kafka_broker, group_id=settings.group_id,
                                         enable_auto_commit=False) as committed):
                # capacity: a burst, timed between its 10th and 90th percentile events (steady state)
                await offer.send(CALIBRATION_FRAMES)
                low, high = CALIBRATION_FRAMES // 10, CALIBRATION_FRAMES * 9 // 10
                await tail.wait_until(lambda rs: len(rs) >= low, 60, "the burst's first events", alive=process.alive)
                seconds = await tail.wait_until(lambda rs: len(rs) >= high, 120, "the burst", alive=process.alive)
                capacity = (high - low) / seconds
                await tail.wait_until(lambda rs: len(rs) >= CALIBRATION_FRAMES, 60, "the burst", alive=process.alive)
                baseline_hwm = peak_rss_bytes(process.pid)
                baseline_rss = ps.memory_info().rss

                samples: list[tuple[float, int, int]] = []  # (seconds since the offer began, lag, rss)
                offer_started = time.monotonic()

                async def sample() -> None:
                    while True:
                        samples.append((time.monotonic() - offer_started,
                                        await group_lag(committed, settings.topic, offer), ps.memory_info().rss))
                        await asyncio.sleep(0.5)

                sampler = asyncio.create_task(sample())
                n = int(3 * capacity * OFFER_S)
                offer_s = await offer.send(n, rate=3 * capacity)
                lag_at_end = await group_lag(committed, settings.topic, offer)
                await tail.wait_until(lambda rs: len(rs) >= len(offer.sent), 3 * n / capacity + 60,
                                      "the backlog to drain", alive=process.alive)
                while await group_lag(committed, settings.topic, offer):  # and its offsets committed
                    await asyncio.sleep(0.1)
                drained_after = time.monotonic() - offer_started - offer_s
                sampler.cancel()
                peak_hwm = peak_rss_bytes(process.pid)
                await tail.settle(0.5)
                return dict(capacity=capacity, n=n, offer_s=offer_s, lag_at_end=lag_at_end, drained_after=drained_after,
                            samples=samples, baseline_hwm=baseline_hwm, baseline_rss=baseline_rss, peak_hwm=peak_hwm,
                            sent=list(offer.sent), frames=list(tail.frames.items()), wire_bytes=offer.wire_bytes,
                            rc=process.terminate())
        finally:
            if process.alive():
                process.kill()

    r = asyncio.run(scenario())
    capacity, n, offer_s = r["capacity"], r["n"], r["offer_s"]
    offered_rate = n / offer_s
    lags = [lag for _, lag, _ in r["samples"]]
    growth = r["peak_hwm"] - r["baseline_hwm"]
    backlog_bytes = max(lags) * SIDE * SIDE  # what the backlog would take as decoded frames

    assert r["rc"] == 0
    assert offered_rate > 1.5 * capacity, f"the test offered only {offered_rate:.0f}/s for a capacity of {capacity:.0f}/s"
    # nothing lost, nothing doubled
    assert dict(r["frames"]) == dict.fromkeys(r["sent"], 1)
    # the lag grew while the offer lasted (by more than a second of capacity), then drained to zero
    assert r["lag_at_end"] > capacity
    # memory: bounded by the settings, not by the backlog (which is far larger than the bound)
    assert growth <= bound, f"peak RSS grew {growth / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
    assert backlog_bytes > bound, "the backlog must exceed the bound for this test to mean something"

    record_figures(f"overload_{int(OFFER_S)}s", {
        "offer_s": round(offer_s, 1), "capacity_fps": round(capacity), "offered_fps": round(offered_rate),
        "frames": len(r["sent"]), "jpeg_bytes": round(r["wire_bytes"]), "max_lag_frames": max(lags),
        "lag_at_end_of_offer": r["lag_at_end"], "drain_s_after_offer": round(r["drained_after"], 1),
        "max_backlog_decoded_mib": round(backlog_bytes / 2**20), "baseline_peak_rss_mib": round(r["baseline_hwm"] / 2**20),
        "peak_rss_mib": round(r["peak_hwm"] / 2**20), "rss_growth_mib": round(growth / 2**20, 1),
        "memory_bound_mib": round(bound / 2**20), "lag_samples": [(round(t, 1), lag) for t, lag, _ in r["samples"]][::4],
    })
