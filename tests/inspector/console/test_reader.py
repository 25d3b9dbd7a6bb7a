"""A console that cannot reach Kafka says so and keeps retrying; it connects once a broker answers, and
shows an outage after that too. It stops promptly even while Kafka is gone."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from inspector.broker import LocalBroker, free_port
from inspector.console.app import running_console

pytestmark = pytest.mark.kafka


def test_unreachable_kafka_is_shown_and_retried(console_settings, fetch) -> None:
    port = free_port()
    settings = console_settings(bootstrap_servers=f"127.0.0.1:{port}")

    async def kafka_state(url: str) -> dict:
        status, _, body = await fetch(url + "api/state")
        assert status == 200  # the page keeps answering
        return orjson.loads(body)["kafka"]

    async def until(url: str, state: str) -> dict:
        async with asyncio.timeout(30):
            while (kafka := await kafka_state(url))["state"] != state:
                await asyncio.sleep(0.1)
        return kafka

    async def scenario() -> None:
        async with running_console(settings) as console:
            down = await until(console.url, "unreachable")
            assert down["servers"] == f"127.0.0.1:{port}" and "retrying" in down["detail"]
            assert (await fetch(console.url + "frames/t/0/0"))[0] == 404
            with LocalBroker(port):
                await until(console.url, "connected")
            await until(console.url, "unreachable")  # an outage after connecting shows too

    asyncio.run(scenario())
