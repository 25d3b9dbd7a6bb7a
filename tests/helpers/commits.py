"""Commit policies that have already fetched some records, for the offset tests."""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import TopicPartition

from inspector.offsets import CommitFn, CommitPolicy


def tracking(commit: CommitFn, tp: TopicPartition, offsets: Iterable[int]) -> CommitPolicy:
    """A policy committing through `commit` that tracks `offsets` of `tp` as fetched, none finished yet."""
    policy = CommitPolicy(commit)
    for offset in offsets:
        policy.track(tp, offset)
    return policy
