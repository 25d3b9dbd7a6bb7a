"""Produce: outputs (defect events and dead letters) through one producer with acks=all.

Producing never waits for acknowledgements — a settle task per call does, and hands the acknowledged
outputs to the caller's `on_acked` (the service commits their offsets there) — so inference keeps
going while the broker confirms. A failed send is fatal (`failure()` raises): the frames stay
uncommitted and a restart re-reads them.

A call's outputs are appended to one record batch per partition (the partition aiokafka's default
partitioner gives the key, as `send` would) and each batch is sent whole: one future per partition
instead of one per record, about 40 % less producer CPU per event than a `send` per record (measured
against the local broker: 17 vs 28 µs). Records of one partition keep their order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder

from inspector.outputs import Output

OnAcked = Callable[[Sequence[Output]], Awaitable[None]]


class SinkError(RuntimeError):
    pass


class Sink:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._partitioner = DefaultPartitioner()  # the producer's own (connect.new_producer sets no other)
        self._settling: set[asyncio.Task[None]] = set()
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def produce(self, outputs: Sequence[Output], on_acked: OnAcked) -> None:
        """Hand `outputs` to the producer; `on_acked(outputs)` runs once the broker has acknowledged all of them."""
        acks = [await self._producer.send_batch(batch, topic, partition=partition)
                for (topic, partition), batch in await self._batches(outputs)]
        task = asyncio.create_task(self._settle(acks, outputs, on_acked))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _batches(self, outputs: Sequence[Output]) -> list[tuple[tuple[str, int], BatchBuilder]]:
        """The outputs as closed record batches, per (topic, partition); a full batch is followed by another."""
        partitions: dict[str, list[int]] = {}
        filling: dict[tuple[str, int], BatchBuilder] = {}
        full: list[tuple[tuple[str, int], BatchBuilder]] = []
        for o in outputs:
            if o.topic not in partitions:
                partitions[o.topic] = sorted(await self._producer.partitions_for(o.topic))
            where = (o.topic, self._partitioner(o.key, partitions[o.topic], partitions[o.topic]))
            batch = filling.get(where)
            if batch is None or not _append(batch, o):
                if batch is not None:
                    full.append((where, batch))
                batch = filling[where] = self._producer.create_batch()
                if not _append(batch, o):
                    raise SinkError(f"an output of {len(o.value)} bytes does not fit in an empty producer batch")
        batches = full + list(filling.items())
        for _, batch in batches:
            batch.close()
        return batches

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


def _append(batch: BatchBuilder, o: Output) -> bool:
    return batch.append(key=o.key, value=o.value, timestamp=None, headers=o.headers) is not None
