"""The sink sends a call's outputs as one record batch per partition: each record lands where a per-record `send`
would put it (the key's partition), in order, and `on_acked` hears about all of them once, after the broker
acknowledged them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from inspector.outputs import Output
from inspector.records import Record, utc_now
from inspector.sink import Sink
from tests.helpers.streams import read_records

pytestmark = pytest.mark.kafka
PARTITIONS = 3


def outputs(topic: str, n: int, cameras: int, value_bytes: int = 100) -> list[Output]:
    now = utc_now()
    out = []
    for i in range(n):
        key = f"cam-{i % cameras}".encode()
        record = Record(TopicPartition("frames", 0), i, key, b"", (), now, now)
        value = f"{i:06d}".encode().ljust(value_bytes, b".")
        out.append(Output(topic, key, value, [("n", str(i).encode())], None, record))  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("value_bytes", [100, 6000])  # 6000: more than one batch's worth per partition
def test_outputs_land_on_their_keys_partitions_in_order_and_are_acknowledged_once(
        kafka_broker: str, new_topic, value_bytes: int) -> None:
    topic = new_topic(partitions=PARTITIONS)
    sent = outputs(topic, 40, cameras=5, value_bytes=value_bytes)

    async def scenario() -> list[Sequence[Output]]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_broker, acks="all")
        await producer.start()
        acked: list[Sequence[Output]] = []

        async def on_acked(done: Sequence[Output]) -> None:
            acked.append(done)

        try:
            sink = Sink(producer)
            await sink.produce(sent, on_acked)
            await sink.flush()
        finally:
            await producer.stop()
        return acked

    acked = asyncio.run(scenario())
    assert [list(a) for a in acked] == [sent]
    records = asyncio.run(read_records(kafka_broker, topic, len(sent)))
    assert len(records) == len(sent)
    partitioner, partitions = DefaultPartitioner(), list(range(PARTITIONS))
    for r in records:
        assert r.partition == partitioner(r.key, partitions, partitions)
        assert r.value[:6].decode() == dict(r.headers)["n"].decode().zfill(6)
    for p in partitions:
        numbers = [int(r.value[:6]) for r in records if r.partition == p]
        assert numbers == sorted(numbers)
    assert len({r.partition for r in records}) > 1
