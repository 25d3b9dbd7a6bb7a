"""The service's aiokafka clients, built from the settings, and starting them against a broker that may
not be up yet: retry with capped backoff.

The consumer commits manually only (the service commits, never aiokafka); the producer waits for every
in-sync replica (acks=all). A start failure is one warning line naming the servers and what happens
next; later attempts log at debug, and success after a failure is one info line. One attempt gets
`connect_timeout_s`: an address that accepts TCP but never answers in Kafka (a wrong port, a stuck proxy)
would otherwise hold it for aiokafka's request timeout (40 s) without a word. Stopping (the `stop` event)
ends the wait at once, an attempt in progress included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from inspector.detach import CANCEL_GRACE_S, Stopped, unless_stopped
from inspector.settings import Settings, kafka_client_kwargs


class Startable(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


C = TypeVar("C", bound=Startable)

FIRST_BACKOFF_S = 0.5


def new_consumer(settings: Settings) -> AIOKafkaConsumer:
    """Manual commits only; subscribed after it starts, together with the commit policy it serves."""
    s = settings
    fetch_bytes = s.max_frame_bytes + 64 * 1024  # one frame at the size limit must fit in a fetch
    return AIOKafkaConsumer(
        group_id=s.group_id, enable_auto_commit=False, auto_offset_reset=s.auto_offset_reset,
        session_timeout_ms=s.session_timeout_ms, heartbeat_interval_ms=s.heartbeat_interval_ms,
        fetch_max_wait_ms=s.fetch_max_wait_ms, max_partition_fetch_bytes=max(fetch_bytes, 1024 * 1024),
        fetch_max_bytes=max(fetch_bytes, 50 * 1024 * 1024),
        **kafka_client_kwargs(s),
    )


def new_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(acks="all", linger_ms=2, **kafka_client_kwargs(settings))


async def start_with_retry(factory: Callable[[], C], *, name: str, servers: str, stop: asyncio.Event,
                           backoff_max_s: float, attempt_timeout_s: float | None = None) -> C | None:
    """A started client, or None if `stop` was set before the broker answered. `attempt_timeout_s`: how long one
    attempt may take (None: as long as aiokafka takes)."""
    log = structlog.get_logger(__name__).bind(client=name, bootstrap_servers=servers)
    backoff, attempt = FIRST_BACKOFF_S, 0
    while not stop.is_set():
        attempt += 1
        client = factory()
        try:
            await unless_stopped(asyncio.wait_for(client.start(), attempt_timeout_s), stop)
        except Stopped:
            await close_within(client, CANCEL_GRACE_S)
            return None
        except (KafkaConnectionError, KafkaError, OSError, TimeoutError) as err:
            await close_within(client, CANCEL_GRACE_S)
            if isinstance(err, TimeoutError):
                err = KafkaConnectionError(f"no Kafka answer within {attempt_timeout_s:g}s (connect_timeout_s)")
            if attempt == 1:
                log.warning("kafka_unreachable", error=_describe(err),
                            action=f"retrying with backoff up to {backoff_max_s:g}s until it answers or a signal")
            else:
                log.debug("kafka_retry", attempt=attempt, error=_describe(err), backoff_s=backoff)
            try:
                await asyncio.wait_for(stop.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, backoff_max_s)
            continue
        if attempt > 1:
            log.info("kafka_connected", attempts=attempt)
        return client
    return None


async def close_within(client: Startable, timeout_s: float) -> bool:
    """`client.stop()`, given `timeout_s` (a broker that stopped answering must not hold a shutdown); whether it
    finished in time."""
    try:
        async with asyncio.timeout(timeout_s):
            await client.stop()
    except TimeoutError:
        return False
    return True


def _describe(err: BaseException) -> str:
    text = str(err)
    return text if text.startswith(type(err).__name__) else f"{type(err).__name__}: {text}"
