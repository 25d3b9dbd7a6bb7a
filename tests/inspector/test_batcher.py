import asyncio
import time

import pytest

from inspector.batcher import BatcherClosed, MicroBatcher


def run(coro):
    return asyncio.run(coro)


def test_a_full_batch_leaves_at_once_and_the_rest_after_max_wait():
    async def scenario():
        batcher = MicroBatcher(max_batch=4, max_wait_s=0.2, capacity=16)
        for i in range(6):
            await batcher.put(i)
        started = time.monotonic()
        first = await batcher.next_batch()
        full_after = time.monotonic() - started
        second = await batcher.next_batch()
        return first.items, full_after, second.items, second.queue_wait_s

    first, full_after, second, waited = run(scenario())
    assert first == [0, 1, 2, 3] and full_after < 0.15
    assert second == [4, 5] and waited >= 0.2


def test_a_partial_batch_waits_for_more_items_until_the_deadline():
    async def scenario():
        batcher = MicroBatcher(max_batch=3, max_wait_s=1.0, capacity=8)
        await batcher.put("a")

        async def late():
            await asyncio.sleep(0.05)
            await batcher.put("b")
            await batcher.put("c")

        producer = asyncio.create_task(late())
        batch = await batcher.next_batch()
        await producer
        return batch.items

    assert run(scenario()) == ["a", "b", "c"]


def test_put_waits_while_the_queue_is_full():
    async def scenario():
        batcher = MicroBatcher(max_batch=2, max_wait_s=0.0, capacity=2)
        await batcher.put(1)
        await batcher.put(2)
        blocked = asyncio.create_task(batcher.put(3))
        await asyncio.sleep(0.05)
        was_blocked = not blocked.done()
        taken = (await batcher.next_batch()).items
        await asyncio.wait_for(blocked, 1.0)
        return was_blocked, taken, len(batcher)

    assert run(scenario()) == (True, [1, 2], 1)


def test_close_drains_what_is_queued_then_ends():
    async def scenario():
        batcher = MicroBatcher(max_batch=4, max_wait_s=10.0, capacity=8)
        for i in range(3):
            await batcher.put(i)
        await batcher.close()
        batches = [await batcher.next_batch(), await batcher.next_batch()]
        with pytest.raises(BatcherClosed):
            await batcher.put(9)
        return batches

    first, end = run(scenario())
    assert first.items == [0, 1, 2] and end is None


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError):
        MicroBatcher(max_batch=8, max_wait_s=0.01, capacity=4)
