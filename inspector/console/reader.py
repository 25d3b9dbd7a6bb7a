"""The console's Kafka side: the events and dead-letter topics in, the frames consumer for pictures.

A consumer group of its own (one per process by default), so the console sees the events of every
inspector replica and never takes partitions from them. It never commits: it is a viewer that starts
at the end of the topics (or at their start with `from_beginning`). Records are validated against the
contracts in a worker thread; what is not a valid message is counted, not shown. While Kafka cannot be
reached the page says so and the clients retry with backoff; nothing here ends the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from inspector.connect import start_with_retry
from inspector.console.board import Board, Link
from inspector.console.pictures import PictureCache
from inspector.console.settings import ConsoleSettings
from inspector.settings import kafka_client_kwargs
from schemas.messages import DeadLetter, DefectEvent

FETCH_MAX_RECORDS = 2000
FETCH_TIMEOUT_MS = 250
PROBE_S = 2.0
STOP_TIMEOUT_S = 2.0  # leaving the group needs the broker; without one, stopping must not wait for it

log = structlog.get_logger(__name__)


class Invalid:
    def __init__(self, topic: str) -> None:
        self.topic = topic


Parsed = DefectEvent | DeadLetter | Invalid


def parse_records(records: Sequence[Any], events_topic: str) -> list[Parsed]:
    """Each record validated as a DefectEvent (events topic) or a DeadLetter (the other one)."""
    out: list[Parsed] = []
    for record in records:
        model = DefectEvent if record.topic == events_topic else DeadLetter
        try:
            out.append(model.model_validate_json(record.value or b""))
        except (ValidationError, ValueError):
            out.append(Invalid(record.topic))
    return out


class _Assignment(ConsumerRebalanceListener):
    """Counts the partitions whose start position is known: from then on no event on them is missed."""

    def __init__(self, consumer: AIOKafkaConsumer, link: Link) -> None:
        self._consumer, self._link = consumer, link
        self._positions: asyncio.Task[None] | None = None

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if self._positions is not None:
            self._positions.cancel()
        self._link.partitions = 0

    async def on_partitions_assigned(self, assigned: Any) -> None:
        # not awaited here: the positions resolve only once the rebalance this listener is part of is over
        self._positions = asyncio.create_task(self._resolve(list(assigned)))

    async def _resolve(self, assigned: list[Any]) -> None:
        for tp in assigned:
            await self._consumer.position(tp)
        self._link.partitions = len(assigned)


class EventReader:
    def __init__(self, settings: ConsoleSettings, board: Board) -> None:
        self._settings, self._board = settings, board
        self._client = kafka_client_kwargs(settings)  # type: ignore[arg-type]  # reads bootstrap + security only

    async def run(self, stop: asyncio.Event) -> None:
        s = self._settings
        consumer = await start_with_retry(self._new_consumer, name="console", servers=s.bootstrap_servers,
                                          stop=stop, backoff_max_s=s.connect_backoff_max_s)
        if consumer is None:
            return
        self._board.link.up()
        consumer.subscribe([s.topic, s.dead_letter_topic], listener=_Assignment(consumer, self._board.link))
        # cancelled, not asked to stop: getmany waits for an assignment as long as the group has none
        loops = [asyncio.create_task(self._consume(consumer)), asyncio.create_task(self._probe(consumer))]
        try:
            await stop.wait()
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await close(consumer)

    def _new_consumer(self) -> AIOKafkaConsumer:
        s = self._settings
        self._board.link.attempt()
        return AIOKafkaConsumer(
            group_id=s.consumer_group, enable_auto_commit=False,
            auto_offset_reset="earliest" if s.from_beginning else "latest",
            session_timeout_ms=s.session_timeout_ms, heartbeat_interval_ms=s.heartbeat_interval_ms,
            **self._client)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=FETCH_TIMEOUT_MS, max_records=FETCH_MAX_RECORDS)
            except KafkaError as err:  # the client reconnects by itself; say so and go on
                self._board.link.down(f"{type(err).__name__}: {err}")
                await asyncio.sleep(PROBE_S)
                continue
            records = [record for batch in batches.values() for record in batch]
            if records:
                for item in await asyncio.to_thread(parse_records, records, self._settings.topic):
                    self._add(item)

    def _add(self, item: Parsed) -> None:
        if isinstance(item, DefectEvent):
            self._board.add_event(item)
        elif isinstance(item, DeadLetter):
            self._board.add_dead_letter(item)
        else:
            self._board.add_invalid(item.topic)

    async def _probe(self, consumer: AIOKafkaConsumer) -> None:
        """Ask the brokers for metadata every few seconds, so an outage after connecting shows on the page."""
        link, wanted = self._board.link, {self._settings.topic, self._settings.dead_letter_topic}
        while True:
            try:
                async with asyncio.timeout(PROBE_S * 2):
                    topics = await consumer.topics()
            except (KafkaError, TimeoutError, OSError) as err:
                if link.state != "unreachable":
                    log.warning("kafka_unreachable", bootstrap_servers=link.servers, error=type(err).__name__)
                link.down(f"no answer from {link.servers}")
            else:
                missing = sorted(wanted - set(topics))
                if link.state != "connected":
                    log.info("kafka_connected", bootstrap_servers=link.servers)
                link.up()
                link.detail = f"topic(s) not found yet: {', '.join(missing)}" if missing else ""
            await asyncio.sleep(PROBE_S)


async def serve_pictures(settings: ConsoleSettings, pictures: PictureCache, stop: asyncio.Event) -> None:
    """Connect the pictures' consumer (retrying like the reader) and keep it until `stop`."""
    factory = PictureCache.consumer_factory(kafka_client_kwargs(settings))  # type: ignore[arg-type]
    consumer = await start_with_retry(factory, name="console-pictures", servers=settings.bootstrap_servers,
                                      stop=stop, backoff_max_s=settings.connect_backoff_max_s)
    if consumer is None:
        return
    pictures.attach(consumer)
    try:
        await stop.wait()
    finally:
        pictures.attach(None)
        await close(consumer)


async def close(consumer: AIOKafkaConsumer) -> None:
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await consumer.stop()
    except TimeoutError:
        log.warning("kafka_stop_timeout", seconds=STOP_TIMEOUT_S)
