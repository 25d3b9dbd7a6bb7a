"""The inspector's settings: one frozen class, built once by the CLI and passed down.

Precedence: CLI flags > environment (`INSPECTOR_…`, nested with `__`) > `.env` > defaults. The CLI
is generated from these fields (inspector/cli.py), their docstrings are its help. Kafka security
(SSL, SASL PLAIN/SCRAM) sits in `kafka` and becomes aiokafka client arguments through
`kafka_client_kwargs`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stripnet.budget import CheckpointLimits

DeviceName = Literal["auto", "cpu", "cuda"]
# The CPU inference backends: the one list of their names. Each has one runner class (inspector/runners.py,
# RUNNERS); CUDA and --locate always run torch. "auto" picks bf16 or onnxruntime from the CPU's flags.
CpuBackend = Literal["bf16", "torch", "onnxruntime", "compile"]
BackendName = Literal["auto", CpuBackend]
LogLevel = Literal["debug", "info", "warning", "error"]


class KafkaSecurity(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None
    """the password of ssl_keyfile, if it is encrypted"""

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
        use_attribute_docstrings=True,
    )

    bootstrap_servers: str = "localhost:9092"
    """Kafka bootstrap servers (host:port, comma-separated)"""
    topic: str = "strip.frames"
    """frames topic"""
    output_topic: str = "strip.defects"
    """defect events topic"""
    dead_letter_topic: str = "strip.frames.dlq"
    """invalid frames topic"""
    group_id: str = "strip-inspector"
    """consumer group"""
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    """where a new group starts (earliest: a new group must not skip frames)"""
    session_timeout_ms: int = Field(default=10_000, gt=0)
    heartbeat_interval_ms: int = Field(default=3_000, gt=0)
    fetch_max_wait_ms: int = Field(default=20, ge=0)
    """how long the broker may hold a fetch for data"""

    model_dir: Path | None = None
    """directory of published model versions (none: the bundled model)"""
    model_poll_s: float = Field(default=2.0, gt=0)
    """how often the model directory is checked for a newer version"""
    model_limits: CheckpointLimits = CheckpointLimits()
    """what a model version may cost (file sizes, blocks, parameters, MACs, activations), checked before it is
    read or built: the model directory is untrusted input"""
    model_read_timeout_s: float = Field(default=30.0, gt=0)
    """longest reading a version may take; then it is rejected (the read is left behind on a daemon thread)"""
    model_rejects_file: Path | None = Path(tempfile.gettempdir(), f"strip-inspector-{os.getuid()}", "rejects.json")
    """where rejected versions are remembered across restarts (a temporary directory outlives a container
    restart in its pod); none: in memory only"""

    device: DeviceName = "auto"
    fp16: bool = False
    """half precision on CUDA"""
    threads: int | None = Field(default=1, gt=0)
    """intra-op threads for CPU inference; measured on the 2-core box (README), 1 beat 2 by 4-10x per batch
    once anything else ran (the event loop, decoding, a trainer)"""
    keep_freed_memory: bool = True
    """glibc keeps freed memory mapped and reuses it instead of returning it to the kernel (stripnet/allocator.py).
    Without it the eager bf16 runner faulted its maps in afresh every batch: the model's CPU per frame at saturation
    was 0.87-1.13 ms with it against 1.29-1.61 without, in two service benchmark runs on an AVX-512 host; no effect
    of either sign on onnxruntime (README, Performance). The price, a process that keeps its peak heap: ~30 MiB"""
    inference_workers: int = Field(default_factory=lambda: min(2, os.cpu_count() or 1), gt=0)
    """threads each running whole batches (events still leave in batch order); default 2 on a machine with 2 or
    more cores (measured on 2 shared cores, two runs: 1.04-1.38x the saturation of one worker, 1.3-1.8x the frames
    delivered at 1,000/s offered; README, Performance)"""
    backend: BackendName = "auto"
    """CPU inference runtime (CUDA and --locate run torch). auto: bf16 (eager torch, accuracy-gated at each model
    load) where the CPU reports avx512_bf16 or amx_bf16, else onnxruntime (fp32: 1.2-2.2x the frames/s of eager
    torch fp32, measured side by side on this box; README, Performance); bf16 or onnxruntime force either"""

    max_batch: int = Field(default=32, gt=0)
    """largest inference batch"""
    max_wait_ms: float = Field(default=10.0, ge=0)
    """longest a frame waits for its batch to fill"""
    queue_frames: int = Field(default=256, gt=0)
    """frames in flight (fetched, not yet committed)"""

    max_frame_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=4096 * 4096, gt=0)
    max_clock_skew_s: float = Field(default=86_400.0, gt=0)
    """a frame whose captured_at is further than this from its record's broker timestamp is dead-lettered
    (clock_skew): a camera clock on a wrong date would give absurd times and latencies; a day admits cameras
    that buffer frames while the network is away"""
    confidence_threshold: float = Field(default=0.5, ge=0, le=1)
    """below it an event's status is 'uncertain' (for a label without its own class_thresholds entry)"""
    class_thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] = {}
    """label → the confidence a frame of that label needs for status 'defect' (operator-owned; labels not named
    use confidence_threshold), e.g. '{"scratches": 0.8, "crazing": 0.4}'"""
    ood_threshold: float | None = None
    """unknown score above which a frame's status is 'unknown' (none: the threshold calibrated with the model; the
    default combined detector's scores are standardized, so they can be negative)"""
    locate: bool = False
    """add class-activation boxes to events"""

    http_host: str = "0.0.0.0"
    """address of /metrics, /live, /ready: all interfaces, because the kubelet's probes and Prometheus come
    from outside the container (the endpoints are read-only); 127.0.0.1 keeps them on this machine"""
    http_port: int = Field(default=9400, ge=0, le=65535)
    """port of /metrics, /live, /ready; 0 = any free port (the bound address is logged: http_listening)"""

    log_level: LogLevel = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    """auto: JSON lines unless stderr is a terminal"""
    summary_interval_s: float = Field(default=10.0, gt=0)
    shutdown_timeout_s: float = Field(default=5.0, gt=0)
    """longest a stop (or a rebalance) waits for in-flight frames and their commit"""
    connect_backoff_max_s: float = Field(default=10.0, gt=0)
    """longest pause between attempts to reach the broker"""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """longest one attempt to reach the broker may take (aiokafka's own request timeout is 40 s): an address that
    accepts connections but does not speak Kafka (a wrong port, a stuck proxy) gets kafka_unreachable this soon"""

    kafka: KafkaSecurity = KafkaSecurity()

    @model_validator(mode="after")
    def _batch_fits_the_queue(self) -> Settings:
        if self.queue_frames < self.max_batch:
            raise ValueError(f"queue_frames ({self.queue_frames}) must be at least max_batch ({self.max_batch}): "
                             "no more frames than queue_frames are ever in flight, so a batch would never fill")
        return self

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> Settings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms should be at most a third of session_timeout_ms")
        return self


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
            password=sec.ssl_password.get_secret_value() if sec.ssl_password else None,
        )
    if sec.security_protocol.startswith("SASL_"):
        kwargs |= {"sasl_mechanism": sec.sasl_mechanism, "sasl_plain_username": sec.sasl_username,
                   "sasl_plain_password": sec.sasl_password.get_secret_value() if sec.sasl_password else None}
    return kwargs
