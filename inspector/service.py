"""The pipeline: consume → decode → batch → infer → build events and dead letters → produce → commit.

`Pipeline` holds one connected run's pieces and has one method per step, in that order: the source
fetches within the in-flight budget and decodes off the loop (inspector/source.py); a frame goes to
the batcher, an invalid record straight to its dead letter; inference threads (`inference_workers`,
one by default) run the model on batches while the event loop builds and produces the previous batch's
events (batches leave in order); once the broker acknowledges outputs, `commit` finishes their offsets and commits the
finished prefix (inspector/offsets.py).

`InspectorService` runs it. Start: the initial model is loaded (a missing or invalid one fails fast),
then the producer and the consumer connect, retrying while the broker is unreachable. Models are
swapped between batches when the store finds a newer valid version. Stop (the `stop` event, set by
SIGINT/SIGTERM in `inspector run`): fetching stops, what is in flight is drained and committed within
`shutdown_timeout_s`, and the consumer leaves its group.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from inspector.batcher import Batch, MicroBatcher
from inspector.connect import Startable, new_consumer, new_producer, start_with_retry
from inspector.decode import DecodeLimits, Rejected
from inspector.detach import Stopped, on_daemon, unless_stopped
from inspector.metrics import Metrics, with_thread_cpu_time
from inspector.model_store import ServingModel
from inspector.offsets import CommitPolicy
from inspector.outputs import Output, Outputs
from inspector.records import Frame, Record, utc_now
from inspector.runners import Prediction, Runner
from inspector.settings import Settings
from inspector.sink import Sink
from inspector.source import DrainBeforeRevoke, FrameSource

C = TypeVar("C", bound=Startable)


class Models(Protocol):
    """The part of inspector.model_store.ModelStore the service uses."""

    def load_initial(self) -> ServingModel[Runner]: ...
    def poll(self) -> ServingModel[Runner] | None: ...


@dataclass(frozen=True)
class Inferred:
    """One batch between inference and publishing."""

    batch: Batch[Frame]
    prediction: Prediction
    serving: ServingModel[Runner]
    inferred_at: datetime
    inference_s: float


class Pipeline:
    """The data path of one connected run, step by step."""

    def __init__(self, settings: Settings, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                 offsets: CommitPolicy, executor: ThreadPoolExecutor, metrics: Metrics,
                 serving: Callable[[], ServingModel[Runner]]) -> None:
        s = settings
        limits = DecodeLimits(s.max_frame_bytes, s.max_pixels, s.max_clock_skew_s)
        self.source = FrameSource(consumer, offsets, limits=limits,
                                  capacity=s.queue_frames, metrics=metrics,
                                  color=lambda: self.serving().manifest.input.color)
        self.batcher: MicroBatcher[Frame] = MicroBatcher(s.max_batch, s.max_wait_ms / 1000,
                                                         capacity=max(s.queue_frames, s.max_batch))
        self.sink = Sink(producer)
        self.outputs = Outputs(settings)
        self.offsets, self.executor, self.metrics, self.serving = offsets, executor, metrics, serving
        self._log = structlog.get_logger(__name__)

    # 1-2. consume and decode: frames to the batcher, invalid records to their dead letter
    async def consume(self, stop: asyncio.Event) -> None:
        await self.source.run(on_frame=self.batcher.put, on_reject=self.dead_letter, stop=stop)

    async def dead_letter(self, record: Record, rejected: Rejected) -> None:
        self._log.info("dead_letter", topic=record.tp.topic, partition=record.tp.partition, offset=record.offset,
                       reason=rejected.reason, detail=rejected.detail)
        await self.produce([self.outputs.dead_letter(record, rejected)])

    # 3-4. batch and infer, in stages one batch apart: while the inference workers (`inference_workers`
    # threads, one batch each) run the next batches, the event loop builds and produces the events of the one
    # before. Each batch takes its place in `inferred` when it is taken, so events leave in batch order
    # whichever worker finishes first. A failure in any stage stops all.
    async def infer_and_publish(self, workers: int = 1) -> None:
        inferred: asyncio.Queue[asyncio.Future[Inferred] | None] = asyncio.Queue(maxsize=workers)
        taking = asyncio.Lock()
        async with asyncio.TaskGroup() as stages:
            stages.create_task(self.publish(inferred))
            async with asyncio.TaskGroup() as inference:
                for _ in range(workers):
                    inference.create_task(self.infer(inferred, taking))
            await inferred.put(None)

    async def infer(self, inferred: asyncio.Queue[asyncio.Future[Inferred] | None], taking: asyncio.Lock) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with taking:  # one worker at a time takes a batch and its place in the order
                batch = await self.batcher.next_batch()
                if batch is None:
                    return
                slot: asyncio.Future[Inferred] = loop.create_future()
                await inferred.put(slot)
            serving = self.serving()  # models change only between batches
            started = time.perf_counter()
            try:
                prediction, cpu_s = await loop.run_in_executor(self.executor, with_thread_cpu_time,
                                                               serving.runner.predict, [f.image for f in batch.items])
            except asyncio.CancelledError:
                slot.cancel()
                raise
            except Exception as err:
                slot.set_exception(err)  # publish raises it in batch order; the stages stop
                raise
            inference_s = time.perf_counter() - started
            self.metrics.batch_done(len(batch.items), batch.queue_wait_s, inference_s, cpu_s)
            slot.set_result(Inferred(batch, prediction, serving, utc_now(), inference_s))

    # 5. build the events
    async def publish(self, inferred: asyncio.Queue[asyncio.Future[Inferred] | None]) -> None:
        while (slot := await inferred.get()) is not None:
            item = await slot
            frames = item.batch.items
            await self.produce(self.outputs.events(frames, item.prediction.probabilities, item.prediction.boxes,
                                                   item.serving.manifest, item.inferred_at,
                                                   item.prediction.ood_scores))
            self._log.debug("batch", size=len(frames), queue_wait_ms=round(item.batch.queue_wait_s * 1000, 2),
                            inference_ms=round(item.inference_s * 1000, 2), model_version=item.serving.version)

    # 6. produce
    async def produce(self, outputs: Sequence[Output]) -> None:
        await self.sink.produce(outputs, on_acked=self.commit)

    # 7. commit: the broker acknowledged these outputs, so their input records are finished
    async def commit(self, outputs: Sequence[Output]) -> None:
        self.metrics.produced([o.message for o in outputs])
        self.offsets.finish((o.source.tp, o.source.offset) for o in outputs)
        await self.offsets.commit()

    async def drain(self, inference: asyncio.Task[None], deadline: float) -> None:
        """After the source stopped: finish queued frames, wait for acks, commit, all by `deadline` (loop time)."""
        started = time.monotonic()
        self._log.info("draining", queued=len(self.batcher), in_flight=self.offsets.in_flight())
        await self.batcher.close()
        try:
            async with asyncio.timeout_at(deadline):
                await inference
                await self.sink.flush()
        except TimeoutError:
            inference.cancel()
            self._log.warning("drain_timeout", uncommitted=self.offsets.in_flight(),
                              note="uncommitted frames are re-delivered on the next start")
        try:
            async with asyncio.timeout_at(deadline):
                await self.offsets.commit()
        except TimeoutError:  # e.g. the topic vanished and aiokafka retries the commit without end
            self._log.warning("commit_timeout", uncommitted=self.offsets.in_flight(),
                              note="uncommitted frames are re-delivered on the next start")
        self._log.info("drained", seconds=round(time.monotonic() - started, 3), uncommitted=self.offsets.in_flight())


class InspectorService:
    def __init__(self, settings: Settings, models: Models, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self._models = models
        self._serving: ServingModel[Runner] | None = None
        self._stop_by: float | None = None  # loop time by which a stop must be complete, once one began
        self._log = structlog.get_logger(__name__).bind(topic=settings.topic, group_id=settings.group_id)

    @property
    def serving(self) -> ServingModel[Runner] | None:
        return self._serving

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; returns after a clean drain, raises if the pipeline fails. From the moment
        a stop begins, draining, committing and closing the clients all end within `shutdown_timeout_s`,
        whatever state the service was in (loading a model, connecting, serving)."""
        s, self._stop_by = self.settings, None
        try:  # on a daemon thread, and a stop ends the wait: a read that hangs cannot hold start-up or exit
            self._serving = await unless_stopped(on_daemon(self._models.load_initial, "model-load"), stop)
        except Stopped:
            self._log.info("stopped_while_loading_model")
            return
        async with AsyncExitStack() as stack:
            producer = await self._connect(lambda: new_producer(s), "producer", stop)
            if producer is None:
                self._log.info("stopped_before_connecting")
                return
            stack.push_async_callback(self._close, "producer", producer.stop)
            consumer = await self._connect(lambda: new_consumer(s), "consumer", stop)
            if consumer is None:
                self._log.info("stopped_before_connecting")
                return
            stack.push_async_callback(self._close, "consumer", lambda: self._leave(consumer))
            offsets = CommitPolicy(consumer.commit)
            consumer.subscribe([s.topic], listener=DrainBeforeRevoke(offsets, self.metrics, s.shutdown_timeout_s))
            executor = ThreadPoolExecutor(max_workers=s.inference_workers, thread_name_prefix="inference")
            stack.callback(executor.shutdown, wait=False, cancel_futures=True)
            await self._serve(Pipeline(s, consumer, producer, offsets, executor, self.metrics, self._current), stop)

    def _current(self) -> ServingModel[Runner]:
        assert self._serving is not None, "run() loads the initial model first"
        return self._serving

    async def _connect(self, factory: Callable[[], C], name: str, stop: asyncio.Event) -> C | None:
        s = self.settings
        return await start_with_retry(factory, name=name, servers=s.bootstrap_servers, stop=stop,
                                      backoff_max_s=s.connect_backoff_max_s, attempt_timeout_s=s.connect_timeout_s)

    def _deadline(self) -> float:
        """When the stop under way must be complete (set by the first call: a stop, or a failure, began)."""
        if self._stop_by is None:
            self._stop_by = asyncio.get_running_loop().time() + self.settings.shutdown_timeout_s
        return self._stop_by

    async def _close(self, name: str, close: Callable[[], Awaitable[None]]) -> None:
        try:
            async with asyncio.timeout_at(self._deadline()):
                await close()
        except TimeoutError:
            self._log.warning("close_timeout", client=name, shutdown_timeout_s=self.settings.shutdown_timeout_s,
                              note="closed without waiting for the broker")

    async def _leave(self, consumer: AIOKafkaConsumer) -> None:
        await consumer.stop()
        self.metrics.group_joined(False)

    async def _serve(self, pipeline: Pipeline, stop: asyncio.Event) -> None:
        s = self.settings
        self._log.info("inspector_started", model_version=self._current().version, output_topic=s.output_topic,
                       dead_letter_topic=s.dead_letter_topic, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms)
        async with asyncio.TaskGroup() as tasks:
            background = [tasks.create_task(coro) for coro in (
                pipeline.sink.failure(), self._watch_models(), self._log_summaries())]
            inference = tasks.create_task(pipeline.infer_and_publish(s.inference_workers))
            await pipeline.consume(stop)
            await pipeline.drain(inference, self._deadline())
            for task in background:
                task.cancel()
        self._log.info("inspector_stopped", **self.metrics.summary().as_log())

    async def _watch_models(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_poll_s)
            newer = await on_daemon(self._models.poll, "model-poll")  # a poll that hangs holds no exit
            if newer is not None:
                previous, self._serving = self._serving, newer
                self._log.info("model_swapped", version=newer.version,
                               previous_version=previous.version if previous else None)

    async def _log_summaries(self) -> None:
        while True:
            await asyncio.sleep(self.settings.summary_interval_s)
            self._log.info("summary", **self.metrics.summary().as_log())
