"""Produce: outputs (defect events and dead letters) through one producer with acks=all.

Producing never waits for acknowledgements — a settle task per call does, and hands the acknowledged
outputs to the caller's `on_acked` (the service commits their offsets there) — so inference keeps
going while the broker confirms. A failed send is fatal (`failure()` raises): the frames stay
uncommitted and a restart re-reads them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaProducer

from inspector.outputs import Output

OnAcked = Callable[[Sequence[Output]], Awaitable[None]]


class SinkError(RuntimeError):
    pass


class Sink:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._settling: set[asyncio.Task[None]] = set()
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def produce(self, outputs: Sequence[Output], on_acked: OnAcked) -> None:
        """Hand `outputs` to the producer; `on_acked(outputs)` runs once the broker has acknowledged all of them."""
        acks = [await self._producer.send(o.topic, o.value, key=o.key, headers=o.headers) for o in outputs]
        task = asyncio.create_task(self._settle(acks, outputs, on_acked))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, acks: list[asyncio.Future], outputs: Sequence[Output], on_acked: OnAcked) -> None:
        try:
            await asyncio.gather(*acks)
        except Exception as err:  # noqa: BLE001 - any send failure stops the service, reported once
            if not self._failure.done():
                first = outputs[0].source
                self._failure.set_exception(SinkError(
                    f"producing to Kafka failed ({type(err).__name__}: {err}); the frames from "
                    f"{first.tp.topic}/{first.tp.partition}@{first.offset} on stay uncommitted"))
            return
        await on_acked(outputs)

    async def failure(self) -> None:
        """Wait forever, or raise SinkError as soon as a send fails."""
        await self._failure

    async def flush(self) -> None:
        """Wait until every handed-over output is acknowledged and its `on_acked` has run."""
        await self._producer.flush()
        while self._settling:
            await asyncio.gather(*list(self._settling))
        if self._failure.done():
            await self._failure
