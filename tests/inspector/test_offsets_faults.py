"""The commit policy when the broker does not answer a commit: a rebalance must not wait forever.

aiokafka retries a commit on retriable errors without an end (UnknownTopicOrPartition while a topic is
being re-created, a coordinator that keeps moving); found when the local broker restarted empty and the
rebalance listener's commit blocked the group from rejoining for good.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import TopicPartition
from structlog.testing import capture_logs

from tests.helpers.commits import tracking

P0 = TopicPartition("frames", 0)


class HangingConsumer:
    """A consumer whose commits never complete, as aiokafka's retry loop does for a vanished topic."""

    def __init__(self) -> None:
        self.attempts = 0

    async def commit(self, offsets) -> None:
        self.attempts += 1
        await asyncio.Event().wait()


def test_drain_before_revocation_is_bounded_even_when_the_commit_hangs():
    async def scenario():
        consumer = HangingConsumer()
        policy = tracking(consumer.commit, P0, range(3))
        policy.finish([(P0, offset) for offset in range(3)])  # finished, not yet committed
        started = time.monotonic()
        with capture_logs() as logs:
            drained = await policy.drain([P0], timeout_s=0.2)
        return drained, time.monotonic() - started, policy.in_flight(), consumer.attempts, logs

    drained, seconds, in_flight, attempts, logs = asyncio.run(scenario())
    assert drained and attempts == 1
    assert seconds < 2.0, "the rebalance listener returned although the commit never completed"
    assert in_flight == 0  # forgotten: the next owner re-reads from the last committed offset
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["commit_timeout"]
