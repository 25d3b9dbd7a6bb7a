"""`inspector demo`: a local broker, a camera replaying a folder, the inspector, the console and a live summary.

The summary reads the defect events back from the output topic, as a downstream consumer would:
events per class, throughput and latency (frame captured → event emitted). When the frames come from
an ImageFolder (one sub-folder per class, like NEU-CLS), it also shows how often the label agrees with
the folder. Images: --images, else ../shared/datasets/neu-cls next to the repository, else frames it
synthesizes (and says so). Model: --model-dir, else the bundled model, else an untrained network
(and says so: its labels are noise). The operator console (inspector/console) runs in the same process
and the demo prints its URL; `--stay` keeps everything running after the replay, to look at the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from aiokafka import AIOKafkaConsumer

from inspector.app import build
from inspector.broker import LocalBroker, port_open
from inspector.codec import loads
from inspector.console.app import running_console, until_signalled
from inspector.console.settings import ConsoleSettings
from inspector.metrics import Metrics
from inspector.replay import frame_files, replay
from inspector.settings import Settings, kafka_client_kwargs
from inspector.topics import ensure_topics
from stripnet.bundled import resolve_model_dir

if TYPE_CHECKING:
    from inspector.cli import Demo

REPO_ROOT = Path(__file__).resolve().parents[1]
NEU_CLS = REPO_ROOT.parent / "shared" / "datasets" / "neu-cls"  # next to the repository, as `make demo` expects
SYNTH_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
PARTITIONS = 3


class Tally:
    """What the demo's downstream consumer has seen so far."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.events = 0
        self.per_class: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.agree = self.with_truth = 0
        self.latencies_ms: list[float] = []
        self.frame_ids: set[str] = set()

    def add(self, event: dict, class_names: set[str]) -> None:
        if event["frame_id"] in self.frame_ids:
            return  # at-least-once: a re-delivered frame's event is a duplicate
        self.frame_ids.add(event["frame_id"])
        self.events += 1
        self.per_class[event["label"]] += 1
        self.statuses[event["status"]] += 1
        self.latencies_ms.append(event["latency_ms"])
        truth = event["frame_id"].split("/", 1)[0]
        if truth in class_names:
            self.with_truth += 1
            self.agree += truth == event["label"]

    def line(self, expected: int) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        lat = np.percentile(self.latencies_ms, [50, 95]) if self.latencies_ms else (float("nan"),) * 2
        classes = "  ".join(f"{name} {n}" for name, n in sorted(self.per_class.items()))
        agree = f" | agrees with folder {100 * self.agree / self.with_truth:.1f}%" if self.with_truth else ""
        statuses = f"uncertain {self.statuses['uncertain']} unknown {self.statuses['unknown']}"
        return (f"events {self.events}/{expected} | {self.events / elapsed:6.1f} ev/s | latency p50 {lat[0]:.0f} ms "
                f"p95 {lat[1]:.0f} ms | {statuses}{agree} | {classes}")


def synthesize_frames(root: Path, per_class: int = 20, size: int = 200, seed: int = 0) -> Path:
    """Gray textures, one folder per NEU class name: enough to watch the pipeline, not to judge a model."""
    import cv2

    rng = np.random.default_rng(seed)
    for k, name in enumerate(SYNTH_CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.normal(128, 12, (size, size))
            for _ in range(3 + k):
                x, y = rng.integers(0, size, 2)
                cv2.line(base, (int(x), int(y)), (int(x + rng.integers(-60, 60)), int(y + rng.integers(-60, 60))),
                         float(rng.integers(40, 220)), int(1 + k % 3))
            cv2.imwrite(str(folder / f"{name}_{i}.png"), np.clip(base, 0, 255).astype(np.uint8))
    return root


def untrained_model_dir(root: Path) -> Path:
    """A published-layout model directory holding an untrained (random) network."""
    from stripnet.checkpoint import export_checkpoint
    from stripnet.architectures import EG_REPVGG
    from stripnet.network import build_model

    export_checkpoint(build_model(EG_REPVGG, len(SYNTH_CLASSES)), root / "00000000T000000.000000Z-untrained",
                      class_names=SYNTH_CLASSES, model_name="untrained-demo", model_version="untrained",
                      notes="random weights: the demo shows the pipeline, not accuracy")
    return root


def say(text: str) -> None:
    print(text, flush=True)


async def run_demo(demo: Demo) -> int:
    """`inspector demo`: the command's own fields choose the frames, the rate and the broker port; the rest
    are the inspector's settings."""
    async with contextlib.AsyncExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="inspector-demo-")))
        images = demo.images
        if images is None and NEU_CLS.is_dir():
            images = NEU_CLS
            say(f"demo: frames from {images}")
        elif images is None:
            images = synthesize_frames(scratch / "frames")
            say(f"demo: {NEU_CLS} not found; using {len(frame_files(images)[0])} synthesized frames")
        model_dir = demo.model_dir
        if model_dir is None:
            try:
                resolve_model_dir("default")
                say("demo: model = the bundled model")
            except FileNotFoundError:
                model_dir = untrained_model_dir(scratch / "models")
                say("demo: no bundled model yet; using an UNTRAINED network (labels are noise)")
        broker = stack.enter_context(LocalBroker(demo.port))
        say(f"demo: broker (tansu, memory-only) on {broker.bootstrap_servers}")
        settings = demo.model_copy(update={
            "bootstrap_servers": broker.bootstrap_servers, "model_dir": model_dir,
            "session_timeout_ms": 3000, "heartbeat_interval_ms": 500,
        })
        client = kafka_client_kwargs(settings)
        await ensure_topics({settings.topic: PARTITIONS, settings.output_topic: PARTITIONS,
                             settings.dead_letter_topic: PARTITIONS}, client_kwargs=client)
        console = await stack.enter_async_context(running_console(console_settings(settings, demo.console_port)))
        say(f"demo: console on {console.url}" + ("" if demo.stay else " (--stay keeps it open after the replay)"))
        inspector = build(settings)
        expected = len(frame_files(images)[0][: demo.limit])
        stop = asyncio.Event()
        serving = asyncio.create_task(inspector.service.run(stop))
        try:
            await _until_ready(inspector.metrics, serving, demo.timeout)
            say(f"demo: inspector ready (model {inspector.service.serving.version}); replaying {expected} frames"
                + (f" at {demo.rate:g} fps" if demo.rate else ""))
            tally = await _watch(settings, images, demo, expected, client, serving)
            if demo.stay:
                say(f"demo: replay over — the console stays on {console.url}; Ctrl-C stops")
                await until_signalled()
        finally:
            stop.set()
            await serving
        say(f"demo: done — {tally.line(expected)}")
        return 0 if tally.events == expected else 1


def console_settings(settings: Settings, port: int) -> ConsoleSettings:
    """The demo's console: its broker and topics, read from their beginning (a page opened late still shows
    every event), on `port` unless something already listens there (then on a free one)."""
    return ConsoleSettings(
        bootstrap_servers=settings.bootstrap_servers, topic=settings.output_topic,
        dead_letter_topic=settings.dead_letter_topic, from_beginning=True, http_port=0 if port_open(port) else port,
        session_timeout_ms=settings.session_timeout_ms, heartbeat_interval_ms=settings.heartbeat_interval_ms,
        kafka=settings.kafka)


async def _until_ready(metrics: Metrics, serving: asyncio.Task, timeout_s: float) -> None:
    """Wait until the inspector has a model and has joined its group, so latencies measure the pipeline."""
    async with asyncio.timeout(timeout_s):
        while not metrics.ready:
            if serving.done():
                await serving  # raises what stopped it
                raise RuntimeError("the inspector stopped before it was ready")
            await asyncio.sleep(0.05)


async def _watch(settings: Settings, images: Path, demo: Demo, expected: int, client: dict,
                 serving: asyncio.Task) -> Tally:
    """Replay the frames and read the events back until every frame has its event (or the timeout)."""
    class_names = {p.name for p in images.iterdir() if p.is_dir()}
    consumer = AIOKafkaConsumer(settings.output_topic, auto_offset_reset="earliest", **client)
    await consumer.start()
    try:
        camera = asyncio.create_task(replay(images, topic=settings.topic, camera_id="demo-cam", client_kwargs=client,
                                            rate=demo.rate, limit=demo.limit))
        tally, deadline, shown = Tally(), time.monotonic() + demo.timeout, 0.0
        tty = sys.stdout.isatty()
        while tally.events < expected and time.monotonic() < deadline and not serving.done():
            batch = await consumer.getmany(timeout_ms=250)
            for records in batch.values():
                for record in records:
                    tally.add(loads(record.value), class_names)
            if time.monotonic() - shown >= 1.0:
                shown = time.monotonic()
                print(("\r" if tty else "") + tally.line(expected), end="" if tty else "\n", flush=True)
        if tty:
            print()
        await camera
        return tally
    finally:
        await consumer.stop()
