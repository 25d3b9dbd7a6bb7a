"""The commit policy: at-least-once, no frame skipped.

Every fetched record is tracked from the moment it is fetched until its event or dead letter is
acknowledged by the broker. Records finish out of order (a dead letter overtakes frames that wait
for inference), so a partition's committable position is the first offset not yet finished, and
Kafka gets `offset + 1` of the last record of the finished prefix. Commits are serialized, so a
committed position never moves backwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

CommitFn = Callable[[Mapping[TopicPartition, int]], Awaitable[None]]


class OffsetTracker:
    """Pure bookkeeping of in-flight offsets per partition (no I/O)."""

    def __init__(self) -> None:
        self._pending: dict[TopicPartition, dict[int, bool]] = {}  # offset -> finished, in fetch order
        self._position: dict[TopicPartition, int] = {}  # end of the finished prefix: next offset to read
        self._committed: dict[TopicPartition, int] = {}

    def track(self, tp: TopicPartition, offset: int) -> None:
        self._pending.setdefault(tp, {})[offset] = False

    def finish(self, tp: TopicPartition, offset: int) -> None:
        """Mark one record done; records of partitions forgotten since (revoked) are ignored."""
        offsets = self._pending.get(tp)
        if offsets is not None and offset in offsets:
            offsets[offset] = True

    def in_flight(self, tps: Iterable[TopicPartition] | None = None) -> int:
        """Records tracked and not yet part of a finished prefix."""
        return sum(len(self._pending.get(tp, {})) for tp in (self._pending if tps is None else tps))

    def unfinished(self, tps: Iterable[TopicPartition] | None = None) -> int:
        chosen = self._pending if tps is None else tps
        return sum(not done for tp in chosen for done in self._pending.get(tp, {}).values())

    def committable(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Positions to commit: the end of each partition's finished prefix, where it is past the last commit."""
        chosen = list(self._pending if tps is None else tps)
        for tp in chosen:
            self._advance(tp)
        return {tp: pos for tp in chosen if (pos := self._position.get(tp, -1)) > self._committed.get(tp, -1)}

    def committed(self, positions: Mapping[TopicPartition, int]) -> None:
        self._committed.update(positions)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            for table in (self._pending, self._position, self._committed):
                table.pop(tp, None)

    def _advance(self, tp: TopicPartition) -> None:
        offsets = self._pending.get(tp, {})
        last = None
        for offset, done in offsets.items():
            if not done:
                break
            last = offset
        if last is not None:
            self._pending[tp] = {o: d for o, d in offsets.items() if o > last}
            self._position[tp] = last + 1


class CommitPolicy:
    """Commits the finished prefix after acknowledgements, before revocation and at shutdown."""

    def __init__(self, commit: CommitFn) -> None:
        self._commit = commit
        self._log = structlog.get_logger(__name__)
        self._tracker = OffsetTracker()
        self._lock = asyncio.Lock()
        self._progress = asyncio.Condition()

    def track(self, tp: TopicPartition, offset: int) -> None:
        self._tracker.track(tp, offset)

    def in_flight(self, tps: Iterable[TopicPartition] | None = None) -> int:
        """Records fetched and not yet committed: the source's backpressure measure."""
        return self._tracker.in_flight(tps)

    def finish(self, done: Iterable[tuple[TopicPartition, int]]) -> None:
        """Records whose outputs the broker acknowledged; the next `commit` commits what became contiguous."""
        for tp, offset in done:
            self._tracker.finish(tp, offset)

    async def commit(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Commit the finished prefixes; a failed commit is logged and retried with the next one. Wakes
        whoever waits for room or for a drain."""
        try:
            return await self._commit_finished(tps)
        finally:
            async with self._progress:
                self._progress.notify_all()

    async def _commit_finished(self, tps: Iterable[TopicPartition] | None) -> dict[TopicPartition, int]:
        async with self._lock:
            positions = self._tracker.committable(tps)
            if not positions:
                return {}
            try:
                await self._commit(positions)
            except KafkaError as err:  # e.g. CommitFailedError during a rebalance
                self._log.warning("commit_failed", error=f"{type(err).__name__}: {err}",
                                  positions={f"{tp.topic}/{tp.partition}": pos for tp, pos in positions.items()})
                return {}
            self._tracker.committed(positions)
            return positions

    async def wait_for_room(self, capacity: int, timeout_s: float) -> None:
        """Return once fewer than `capacity` records are in flight, or after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s), self._progress:
                await self._progress.wait_for(lambda: self._tracker.in_flight() < capacity)
        except TimeoutError:
            pass

    async def drain(self, tps: Iterable[TopicPartition], timeout_s: float) -> bool:
        """Wait until every tracked record of `tps` is finished (or the timeout), commit (within the timeout
        too), then forget them.
        True if nothing was left unfinished; unfinished records will be re-delivered to the next owner."""
        tps = list(tps)
        try:
            async with asyncio.timeout(timeout_s), self._progress:
                await self._progress.wait_for(lambda: self._tracker.unfinished(tps) == 0)
            drained = True
        except TimeoutError:
            drained = False
        try:  # aiokafka retries a retriable commit error forever; the rebalance must not wait forever
            async with asyncio.timeout(timeout_s):
                await self.commit(tps)
        except TimeoutError:
            names = sorted(f"{tp.topic}/{tp.partition}" for tp in tps)
            self._log.warning("commit_timeout", partitions=names, timeout_s=timeout_s,
                              note="not committed: the next owner re-reads these records")
        self._tracker.forget(tps)
        return drained
