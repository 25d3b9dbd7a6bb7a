"""The inspector service: wires source → batcher → engine → sink, swaps models, stops cleanly.

Start: the initial model is loaded (a missing or invalid model fails fast), then the producer and
the consumer connect, retrying while the broker is unreachable. Run: the source fetches and decodes,
the batcher groups frames, one inference thread runs the model, the sink publishes and its
acknowledgements drive the commits. Models are swapped between batches when the store finds a newer
valid version. Stop (the `stop` event, set by SIGINT/SIGTERM in the CLI): fetching stops, what is in
flight is drained and committed within `shutdown_timeout_s`, and the consumer leaves its group.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from inspector.batcher import Batch, MicroBatcher
from inspector.connect import Startable, start_with_retry
from inspector.decode import DecodeLimits
from inspector.engine import Prediction, Runner
from inspector.events import Frame, defect_event, utc_now
from inspector.model_store import ServingModel
from inspector.offsets import CommitPolicy
from inspector.settings import Settings, kafka_client_kwargs
from inspector.sink import Sink
from inspector.source import DrainBeforeRevoke, FrameSource
from inspector.summary import Fanout, Summary
from inspector.telemetry import NullTelemetry, Telemetry

C = TypeVar("C", bound=Startable)


@dataclass(frozen=True)
class Inferred:
    """One batch between inference and publishing."""

    batch: Batch[Frame]
    prediction: Prediction
    serving: ServingModel[Runner]
    inferred_at: datetime
    inference_s: float


class Models(Protocol):
    """The part of inspector.model_store.ModelStore the service uses."""

    def load_initial(self) -> ServingModel[Runner]: ...
    def poll(self) -> ServingModel[Runner] | None: ...


class InspectorService:
    def __init__(self, settings: Settings, models: Models, *, telemetry: Telemetry = NullTelemetry()) -> None:
        self.settings = settings
        self.summary = Summary()
        self._models = models
        self._telemetry = Fanout(telemetry, self.summary)
        self._serving: ServingModel[Runner] | None = None
        self._log = structlog.get_logger(__name__).bind(topic=settings.topic, group_id=settings.group_id)

    @property
    def serving(self) -> ServingModel[Runner] | None:
        return self._serving

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; returns after a clean drain, raises if the pipeline fails."""
        s = self.settings
        self._serving = await asyncio.to_thread(self._models.load_initial)
        self.summary.model_active(self._serving.manifest)
        async with AsyncExitStack() as stack:
            producer = await self._connect(self._new_producer, "producer", stop)
            if producer is None:
                self._log.info("stopped_before_connecting")
                return
            stack.push_async_callback(producer.stop)
            consumer = await self._connect(self._new_consumer, "consumer", stop)
            if consumer is None:
                self._log.info("stopped_before_connecting")
                return
            stack.push_async_callback(self._leave, consumer)
            offsets = CommitPolicy(consumer.commit)
            consumer.subscribe([s.topic], listener=DrainBeforeRevoke(offsets, self._telemetry, s.shutdown_timeout_s))
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
            stack.callback(executor.shutdown, wait=False, cancel_futures=True)
            await self._serve(consumer, producer, offsets, executor, stop)

    # -- wiring -----------------------------------------------------------------------------------

    async def _connect(self, factory: Callable[[], C], name: str, stop: asyncio.Event) -> C | None:
        s = self.settings
        return await start_with_retry(factory, name=name, servers=s.bootstrap_servers, stop=stop,
                                      backoff_max_s=s.connect_backoff_max_s)

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(acks="all", linger_ms=2, **kafka_client_kwargs(self.settings))

    def _new_consumer(self) -> AIOKafkaConsumer:
        """Manual commits only; subscribed after it starts, together with the commit policy it serves."""
        s = self.settings
        fetch_bytes = s.max_frame_bytes + 64 * 1024  # one frame at the size limit must fit in a fetch
        return AIOKafkaConsumer(
            group_id=s.group_id, enable_auto_commit=False, auto_offset_reset=s.auto_offset_reset,
            session_timeout_ms=s.session_timeout_ms, heartbeat_interval_ms=s.heartbeat_interval_ms,
            fetch_max_wait_ms=s.fetch_max_wait_ms, max_partition_fetch_bytes=max(fetch_bytes, 1024 * 1024),
            fetch_max_bytes=max(fetch_bytes, 50 * 1024 * 1024),
            **kafka_client_kwargs(s),
        )

    async def _leave(self, consumer: AIOKafkaConsumer) -> None:
        await consumer.stop()
        self._telemetry.group_joined(False)

    # -- running ----------------------------------------------------------------------------------

    async def _serve(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, offsets: CommitPolicy,
                     executor: ThreadPoolExecutor, stop: asyncio.Event) -> None:
        s = self.settings
        source = FrameSource(consumer, offsets, limits=DecodeLimits(s.max_frame_bytes, s.max_pixels),
                             capacity=s.queue_frames, telemetry=self._telemetry)
        sink = Sink(producer, offsets, output_topic=s.output_topic, dead_letter_topic=s.dead_letter_topic,
                    telemetry=self._telemetry)
        batcher: MicroBatcher[Frame] = MicroBatcher(s.max_batch, s.max_wait_ms / 1000,
                                                    capacity=max(s.queue_frames, s.max_batch))
        self._log.info("inspector_started", model_version=self._serving.version, output_topic=s.output_topic,
                       dead_letter_topic=s.dead_letter_topic, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms)
        async with asyncio.TaskGroup() as tasks:
            background = [tasks.create_task(coro) for coro in (
                sink.failure(), self._watch_models(), self._log_summaries())]
            inference = tasks.create_task(self._infer(batcher, sink, executor))
            await source.run(on_frame=batcher.put, on_reject=sink.publish_dead_letter, stop=stop)
            await self._drain(batcher, inference, sink, offsets)
            for task in background:
                task.cancel()
        self._log.info("inspector_stopped", **self.summary.snapshot().as_log())

    async def _drain(self, batcher: MicroBatcher[Frame], inference: asyncio.Task, sink: Sink,
                     offsets: CommitPolicy) -> None:
        """After the source stopped: finish queued frames, wait for acks, commit (bounded in time)."""
        started = time.monotonic()
        self._log.info("draining", queued=len(batcher), in_flight=offsets.in_flight())
        await batcher.close()
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout_s):
                await inference
                await sink.flush()
        except TimeoutError:
            inference.cancel()
            self._log.warning("drain_timeout", uncommitted=offsets.in_flight(),
                              note="uncommitted frames are re-delivered on the next start")
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout_s):
                await offsets.commit()
        except TimeoutError:  # e.g. the topic vanished and aiokafka retries the commit without end
            self._log.warning("commit_timeout", uncommitted=offsets.in_flight(),
                              note="uncommitted frames are re-delivered on the next start")
        self._log.info("drained", seconds=round(time.monotonic() - started, 3), uncommitted=offsets.in_flight())

    async def _infer(self, batcher: MicroBatcher[Frame], sink: Sink, executor: ThreadPoolExecutor) -> None:
        """Two stages one batch apart: while the inference thread runs batch k+1, the event loop builds and
        publishes batch k's events (batches leave in order). A failure in either stage stops both."""
        inferred: asyncio.Queue[Inferred | None] = asyncio.Queue(maxsize=1)
        async with asyncio.TaskGroup() as stages:
            stages.create_task(self._publish(inferred, sink))
            await self._predict(batcher, executor, inferred)

    async def _predict(self, batcher: MicroBatcher[Frame], executor: ThreadPoolExecutor,
                       inferred: asyncio.Queue[Inferred | None]) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await batcher.next_batch()) is not None:
            serving = self._serving  # models change only here, between batches
            started = time.perf_counter()
            prediction = await loop.run_in_executor(executor, serving.runner.predict, [f.image for f in batch.items])
            inference_s = time.perf_counter() - started
            self._telemetry.batch_done(len(batch.items), batch.queue_wait_s, inference_s)
            await inferred.put(Inferred(batch, prediction, serving, utc_now(), inference_s))
        await inferred.put(None)

    async def _publish(self, inferred: asyncio.Queue[Inferred | None], sink: Sink) -> None:
        threshold = self.settings.confidence_threshold
        while (item := await inferred.get()) is not None:
            frames, manifest = item.batch.items, item.serving.manifest
            boxes = item.prediction.boxes or [None] * len(frames)
            events = [defect_event(frame, probs, manifest, threshold=threshold, inferred_at=item.inferred_at,
                                   boxes=frame_boxes)
                      for frame, probs, frame_boxes in zip(frames, item.prediction.probabilities, boxes, strict=True)]
            await sink.publish_events(frames, events)
            self.summary.labelled([e.label for e in events])
            self._log.debug("batch", size=len(frames), queue_wait_ms=round(item.batch.queue_wait_s * 1000, 2),
                            inference_ms=round(item.inference_s * 1000, 2), model_version=item.serving.version)

    async def _watch_models(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_poll_s)
            newer = await asyncio.to_thread(self._models.poll)
            if newer is not None:
                previous, self._serving = self._serving, newer
                self.summary.model_active(newer.manifest)
                self._log.info("model_swapped", version=newer.version,
                               previous_version=previous.version if previous else None)

    async def _log_summaries(self) -> None:
        while True:
            await asyncio.sleep(self.settings.summary_interval_s)
            self._log.info("summary", **self.summary.snapshot().as_log())


async def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]], stop: asyncio.Event) -> None:
    """Run `main(stop)`; SIGINT/SIGTERM set `stop`, a second signal cancels outright."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and task is not None:
            task.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await main(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def first_error(err: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group, for a one-line report."""
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    return err


async def run_inspector(settings: Settings) -> int:
    """`inspector run`: engine, model store, metrics endpoint and service, until SIGINT/SIGTERM. Exit code."""
    from inspector.engine import Engine, configure_threads
    from inspector.model_store import ModelStore, NoValidModelError
    from inspector.observability import PrometheusTelemetry, serve_http
    from stripnet.cam import LocateConfig

    log = structlog.get_logger(__name__)
    configure_threads(settings.threads)
    engine = Engine(settings.device, max_batch=settings.max_batch, fp16=settings.fp16,
                    locate=LocateConfig() if settings.locate else None, backend=settings.backend)
    telemetry = PrometheusTelemetry()
    service = InspectorService(settings, ModelStore(settings.model_dir, engine.prepare, telemetry=telemetry),
                               telemetry=telemetry)
    log.info("inspector_starting", device=str(engine.device), backend=engine.backend, threads=torch_threads(),
             bootstrap_servers=settings.bootstrap_servers, model_dir=str(settings.model_dir or "bundled"))
    try:
        async with serve_http(telemetry, settings.http_host, settings.http_port) as endpoint:
            log.info("http_listening", url=endpoint.url, paths=["/metrics", "/live", "/ready"])
            await run_until_signalled(service.run, asyncio.Event())
    except NoValidModelError as err:
        log.error("no_model", reason=str(err))
        return 2
    except Exception as group:  # noqa: BLE001 - one clear line instead of a traceback storm
        err = first_error(group)
        telemetry.set_failed(f"{type(err).__name__}: {err}")
        log.error("inspector_failed", error=f"{type(err).__name__}: {err}", exc_info=err)
        return 1
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
