import asyncio

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError

from inspector.offsets import CommitPolicy, OffsetTracker
from tests.helpers.commits import tracking

P0, P1 = TopicPartition("frames", 0), TopicPartition("frames", 1)


def test_only_the_finished_prefix_is_committable_as_offset_plus_one():
    tracker = OffsetTracker()
    for offset in range(10, 15):
        tracker.track(P0, offset)
    tracker.finish(P0, 11)
    tracker.finish(P0, 12)
    assert tracker.committable() == {}  # 10 is still in flight: committing 13 would skip it
    tracker.finish(P0, 10)
    assert tracker.committable() == {P0: 13}
    tracker.committed({P0: 13})
    assert tracker.committable() == {}
    assert tracker.in_flight() == 2 and tracker.unfinished() == 2


def test_partitions_are_independent_and_forgotten_ones_are_ignored():
    tracker = OffsetTracker()
    tracker.track(P0, 0)
    tracker.track(P1, 5)
    tracker.finish(P1, 5)
    assert tracker.committable() == {P1: 6}
    tracker.forget([P0])
    tracker.finish(P0, 0)  # a late acknowledgement after revocation
    assert tracker.committable() == {P1: 6}
    assert tracker.in_flight([P0]) == 0


class FakeConsumer:
    def __init__(self, fail_first: int = 0) -> None:
        self.commits: list[dict] = []
        self.fail_first = fail_first

    async def commit(self, offsets):
        if self.fail_first:
            self.fail_first -= 1
            raise CommitFailedError("rebalancing")
        self.commits.append(dict(offsets))


async def acknowledged(policy: CommitPolicy, done: list) -> None:
    """What the service does once the broker acknowledges outputs: finish their records, commit."""
    policy.finish(done)
    await policy.commit()


def test_acknowledgements_commit_and_a_failed_commit_is_retried_with_the_next():
    async def scenario():
        consumer = FakeConsumer(fail_first=1)
        policy = tracking(consumer.commit, P0, range(3))
        await acknowledged(policy, [(P0, 0)])  # this commit fails
        await acknowledged(policy, [(P0, 2)])  # offset 1 is still in flight; the failed position 1 is retried
        await acknowledged(policy, [(P0, 1)])
        return consumer.commits

    assert asyncio.run(scenario()) == [{P0: 1}, {P0: 3}]


def test_drain_waits_for_in_flight_records_then_commits_and_forgets():
    async def scenario():
        consumer = FakeConsumer()
        policy = tracking(consumer.commit, P0, range(4))

        async def acks_arrive():
            for offset in range(4):
                await asyncio.sleep(0.01)
                await acknowledged(policy, [(P0, offset)])

        acks = asyncio.create_task(acks_arrive())
        drained = await policy.drain([P0], timeout_s=2.0)
        await acks
        return drained, consumer.commits[-1], policy.in_flight()

    assert asyncio.run(scenario()) == (True, {P0: 4}, 0)


def test_drain_gives_up_after_its_timeout_and_commits_what_is_done():
    async def scenario():
        consumer = FakeConsumer()
        policy = tracking(consumer.commit, P0, range(3))
        await acknowledged(policy, [(P0, 0)])
        drained = await policy.drain([P0], timeout_s=0.05)
        return drained, consumer.commits

    assert asyncio.run(scenario()) == (False, [{P0: 1}])
