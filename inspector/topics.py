"""Creating topics through the admin API (local broker, demos, tests); existing topics are left alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic


async def ensure_topics(partitions: Mapping[str, int], *, client_kwargs: Mapping[str, Any]) -> list[str]:
    """Create the missing topics of `partitions` (name -> partition count); returns the names created."""
    admin = AIOKafkaAdminClient(**client_kwargs)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, count, 1) for name, count in partitions.items() if name not in existing]
        if missing:
            await admin.create_topics(missing)
        return [topic.name for topic in missing]
    finally:
        await admin.close()
