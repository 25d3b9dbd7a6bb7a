"""The console's settings: its own pydantic-settings class, built once in main and passed down.

Precedence: CLI flags > environment (`INSPECTOR_CONSOLE_…`, nested with `__`) > `.env` > defaults. Kafka
security is the inspector's own type (`inspector.settings.KafkaSecurity`), so `INSPECTOR_CONSOLE_KAFKA__…`
takes the same values as `INSPECTOR_KAFKA__…`. Every bound on memory is a field here.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inspector.settings import KafkaSecurity

MIB = 1024 * 1024


class ConsoleSettings(BaseSettings):
    """`inspector console`: a live page of the defect events every inspector replica produces."""

    model_config = SettingsConfigDict(
        env_prefix="INSPECTOR_CONSOLE_", env_nested_delimiter="__", env_file=".env", extra="ignore", frozen=True,
        cli_prog_name="inspector console", cli_kebab_case=True, cli_implicit_flags=True,
        cli_use_class_docs_for_groups=True,
    )

    bootstrap_servers: str = Field(default="localhost:9092", description="Kafka bootstrap servers")
    topic: str = Field(default="strip.defects", description="defect events topic")
    dead_letter_topic: str = Field(default="strip.frames.dlq", description="dead-letter topic (counted by reason)")
    from_beginning: bool = Field(default=False, description="replay the topics from their start, not from now")
    group_id: str | None = Field(default=None, description="consumer group (default: one of its own per process, "
                                                           "so every console sees every partition)")
    host: str = Field(default="127.0.0.1", description="address the page listens on")
    http_port: int = Field(default=9500, ge=0, le=65535, description="port of the page (0 = any free port)")

    max_cards_per_s: float = Field(default=10.0, gt=0, description="cards sent to each browser per second at most")
    recent_events: int = Field(default=500, gt=0, description="events kept for the wall, filters and details")
    wall_cards: int = Field(default=48, gt=0, description="cards a page shows at once")
    picture_cache_mb: float = Field(default=64.0, gt=0, description="memory for frame pictures (LRU)")
    max_picture_bytes: int = Field(default=16 * MIB, gt=0, description="larger frame records are not shown")
    max_pixels: int = Field(default=4096 * 4096, gt=0, description="larger raw frames are not shown")
    picture_timeout_s: float = Field(default=5.0, gt=0, description="how long a picture fetch may take")
    max_keys: int = Field(default=256, gt=0, description="distinct cameras, classes or models counted by name; "
                                                         "the rest count as '(other)'")
    max_coils: int = Field(default=64, gt=0, description="coils kept for the coil view (least recent dropped)")
    max_coil_points: int = Field(default=5000, gt=0, description="defects kept per coil")
    dedupe_window: int = Field(default=20_000, gt=0, description="recent event ids remembered to drop duplicates")
    latency_samples: int = Field(default=10_000, gt=0, description="recent latencies behind the percentiles")
    rate_window_s: int = Field(default=600, gt=0, description="span of the rates chart")
    rate_bucket_s: int = Field(default=10, gt=0, description="width of one point of the rates chart")
    max_clients: int = Field(default=32, gt=0, description="pages connected at once")
    tick_s: float = Field(default=0.25, gt=0, description="how often a page gets new cards")
    stats_interval_s: float = Field(default=1.0, gt=0, description="how often a page gets new figures")

    session_timeout_ms: int = Field(default=10_000, gt=0)
    heartbeat_interval_ms: int = Field(default=3_000, gt=0)
    connect_backoff_max_s: float = Field(default=10.0, gt=0)
    log_level: str = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    kafka: KafkaSecurity = KafkaSecurity()

    @model_validator(mode="after")
    def _consistent(self) -> ConsoleSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms should be at most a third of session_timeout_ms")
        if self.rate_bucket_s > self.rate_window_s:
            raise ValueError("rate_bucket_s must not exceed rate_window_s")
        return self

    @property
    def consumer_group(self) -> str:
        return self.group_id or f"strip-inspector-console-{socket.gethostname()}-{os.getpid()}"

    @property
    def picture_cache_bytes(self) -> int:
        return int(self.picture_cache_mb * MIB)
