"""Micro-batching, as Triton's dynamic batcher: a batch leaves when it is full or when its oldest item
has waited `max_wait_s`, whichever comes first. The queue is bounded: `put` waits while it is full.

`close()` lets the consumer drain what is queued: `next_batch` returns the remaining items, then [].
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Batch(Generic[T]):
    items: list[T]
    queue_wait_s: float  # how long the oldest item waited


class BatcherClosed(RuntimeError):
    pass


class MicroBatcher(Generic[T]):
    def __init__(self, max_batch: int, max_wait_s: float, capacity: int) -> None:
        if max_batch < 1 or capacity < max_batch or max_wait_s < 0:
            raise ValueError("need max_batch >= 1, capacity >= max_batch and max_wait_s >= 0")
        self.max_batch, self.max_wait_s, self.capacity = max_batch, max_wait_s, capacity
        self._items: deque[tuple[float, T]] = deque()
        self._changed = asyncio.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, item: T) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._items) < self.capacity or self._closed)
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._items.append((time.monotonic(), item))
            self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def next_batch(self) -> Batch[T] | None:
        """The next batch; None once the batcher is closed and empty."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._items or self._closed)
            if not self._items:
                return None
            deadline = self._items[0][0] + self.max_wait_s
            full = lambda: len(self._items) >= self.max_batch or self._closed  # noqa: E731
            remaining = deadline - time.monotonic()
            if not full() and remaining > 0:
                try:
                    async with asyncio.timeout(remaining):
                        await self._changed.wait_for(full)
                except TimeoutError:
                    pass
            taken = [self._items.popleft() for _ in range(min(self.max_batch, len(self._items)))]
            self._changed.notify_all()
        return Batch([item for _, item in taken], time.monotonic() - taken[0][0])
