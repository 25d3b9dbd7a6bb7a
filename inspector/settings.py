"""The inspector's settings: built once in the CLI and passed down.

Precedence: CLI flags > environment (`INSPECTOR_…`, nested with `__`) > `.env` > defaults.
Kafka security (SSL, SASL PLAIN/SCRAM) sits in `kafka` and becomes aiokafka client arguments
through `kafka_client_kwargs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSecurity(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSecurity:
        if self.security_protocol.startswith("SASL_") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(f"{self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INSPECTOR_", env_nested_delimiter="__", env_file=".env", extra="ignore", frozen=True,
    )

    bootstrap_servers: str = "localhost:9092"
    topic: str = "strip.frames"
    output_topic: str = "strip.defects"
    dead_letter_topic: str = "strip.frames.dlq"
    group_id: str = "strip-inspector"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"  # a new group must not skip frames
    session_timeout_ms: int = Field(default=10_000, gt=0)
    heartbeat_interval_ms: int = Field(default=3_000, gt=0)
    fetch_max_wait_ms: int = Field(default=20, ge=0, description="how long the broker may hold a fetch for data")

    model_dir: Path | None = None
    model_poll_s: float = Field(default=2.0, gt=0)

    device: Literal["auto", "cpu", "cuda"] = "auto"
    fp16: bool = False
    # Measured on the 2-core box (README): 1 intra-op thread beat 2 by 4-10x per batch once anything else
    # ran (the event loop, decoding, a trainer); None = torch's default (one per core).
    threads: int | None = Field(default=1, gt=0, description="torch intra-op threads for CPU inference")
    # CPU inference runtime (inspector/backends.py); CUDA and --locate always run torch. ONNX Runtime is the
    # default: measured side by side in one process through Runner.predict on this box, 1.2-2.2x the frames/s
    # of eager torch at batch 1, 8 and 32 (README, Performance).
    backend: Literal["torch", "onnxruntime", "compile"] = "onnxruntime"

    max_batch: int = Field(default=32, gt=0)
    max_wait_ms: float = Field(default=10.0, ge=0)
    queue_frames: int = Field(default=256, gt=0, description="frames in flight (fetched, not yet committed)")

    max_frame_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=4096 * 4096, gt=0)
    confidence_threshold: float = Field(default=0.5, ge=0, le=1)
    locate: bool = False

    http_host: str = "0.0.0.0"
    http_port: int = Field(default=9400, ge=0, le=65535)  # 0 = no HTTP endpoint

    log_level: str = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    summary_interval_s: float = Field(default=10.0, gt=0)
    shutdown_timeout_s: float = Field(default=5.0, gt=0)
    connect_backoff_max_s: float = Field(default=10.0, gt=0)

    kafka: KafkaSecurity = KafkaSecurity()

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> Settings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms should be at most a third of session_timeout_ms")
        return self


def load_settings(**overrides: Any) -> Settings:
    """Settings from env/.env/defaults with CLI flags on top; `None` means "flag not given"."""
    return Settings(**{name: value for name, value in overrides.items() if value is not None})


def kafka_client_kwargs(settings: Settings) -> dict[str, Any]:
    """Arguments shared by every aiokafka client (consumer, producer, admin)."""
    sec = settings.kafka
    kwargs: dict[str, Any] = {"bootstrap_servers": settings.bootstrap_servers,
                              "security_protocol": sec.security_protocol}
    if sec.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        kwargs["ssl_context"] = create_ssl_context(
            cafile=str(sec.ssl_cafile) if sec.ssl_cafile else None,
            certfile=str(sec.ssl_certfile) if sec.ssl_certfile else None,
            keyfile=str(sec.ssl_keyfile) if sec.ssl_keyfile else None,
        )
    if sec.security_protocol.startswith("SASL_"):
        kwargs |= {"sasl_mechanism": sec.sasl_mechanism, "sasl_plain_username": sec.sasl_username,
                   "sasl_plain_password": sec.sasl_password.get_secret_value() if sec.sasl_password else None}
    return kwargs
