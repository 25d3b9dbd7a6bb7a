"""Prometheus metrics and the `/metrics`, `/live`, `/ready` HTTP endpoint.

`PrometheusTelemetry` implements the `Telemetry` protocol on its own `CollectorRegistry`, so two
services in one process (tests) never share counters. `serve_http` answers scrapes and probes on a
small asyncio server; building the metrics text runs in a worker thread, so a scrape never stalls
the event loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from schemas.checkpoint import Manifest

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
EVENT_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST_HEAD = 16 * 1024
JSON_TYPE = "application/json"


@dataclass(frozen=True)
class Health:
    """What `/live` and `/ready` report: a consistent snapshot of the service's state."""

    live: bool
    ready: bool
    group_joined: bool
    model_name: str | None
    model_version: str | None
    failure: str | None


class PrometheusTelemetry:
    """The service's metrics on a private registry, plus the state behind the health probes.

    Methods may be called from the event loop or from worker threads (the model store polls in
    one): prometheus-client metrics are thread-safe and the health state sits behind a lock.
    """

    def __init__(self, namespace: str = "inspector") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self._frames = Counter("frames_consumed", "Frames read from Kafka", ["topic", "partition"],
                               namespace=ns, registry=r)
        self._events = Counter("events_produced", "Defect events produced", namespace=ns, registry=r)
        self._dead = Counter("dead_lettered", "Frames sent to the dead-letter topic", ["reason"],
                             namespace=ns, registry=r)
        self._batch = Histogram("batch_size", "Frames per inference batch", buckets=BATCH_SIZE_BUCKETS,
                                namespace=ns, registry=r)
        self._queue_wait = Histogram("queue_wait_seconds", "Time a batch's oldest frame waited in the queue",
                                     buckets=QUEUE_WAIT_BUCKETS, namespace=ns, registry=r)
        self._inference = Histogram("inference_seconds", "Model time per batch (preprocess + forward)",
                                    buckets=INFERENCE_BUCKETS, namespace=ns, registry=r)
        self._latency = Histogram("event_latency_seconds", "Frame produce timestamp to event emitted",
                                  buckets=EVENT_LATENCY_BUCKETS, namespace=ns, registry=r)
        self._lag = Gauge("consumer_lag", "Messages behind the partition's end offset", ["topic", "partition"],
                          namespace=ns, registry=r)
        self._model = Info("model", "The model serving now", namespace=ns, registry=r)
        self._reloads = Counter("model_reloads", "Model reload attempts by result", ["result"],
                                namespace=ns, registry=r)
        self._joined_gauge = Gauge("consumer_group_joined", "1 while partitions are assigned to this consumer",
                                   namespace=ns, registry=r)
        self._ready_gauge = Gauge("ready", "1 while /ready answers 200", namespace=ns, registry=r)
        for result in ("success", "failure"):
            self._reloads.labels(result=result)
        self._lock = threading.Lock()
        self._manifest: Manifest | None = None
        self._joined = False
        self._failure: str | None = None

    # -- Telemetry protocol -------------------------------------------------------------------------

    def frames_consumed(self, topic: str, partition: int, n: int) -> None:
        self._frames.labels(topic=topic, partition=str(partition)).inc(n)

    def events_produced(self, n: int) -> None:
        self._events.inc(n)

    def dead_lettered(self, reason: str) -> None:
        self._dead.labels(reason=reason).inc()

    def batch_done(self, size: int, queue_wait_s: float, inference_s: float) -> None:
        self._batch.observe(size)
        self._queue_wait.observe(max(0.0, queue_wait_s))
        self._inference.observe(max(0.0, inference_s))

    def event_latency(self, seconds: float) -> None:
        # A producer clock ahead of ours gives a negative latency: count it as zero, not as a bogus sum.
        self._latency.observe(max(0.0, seconds))

    def consumer_lag(self, topic: str, partition: int, lag: int) -> None:
        self._lag.labels(topic=topic, partition=str(partition)).set(max(0, lag))

    def model_active(self, manifest: Manifest) -> None:
        self._model.info({"name": manifest.model_name, "version": manifest.model_version,
                          "sha256": manifest.weights_sha256})
        with self._lock:
            self._manifest = manifest
        self._update_ready()

    def model_reload(self, ok: bool, reason: str = "") -> None:
        self._reloads.labels(result="success" if ok else "failure").inc()

    def group_joined(self, joined: bool) -> None:
        if not joined:
            # Lag of partitions we no longer own would be stale: the new owner reports it.
            self._lag.clear()
        with self._lock:
            self._joined = joined
        self._joined_gauge.set(1 if joined else 0)
        self._update_ready()

    # -- health -------------------------------------------------------------------------------------

    def set_failed(self, reason: str) -> None:
        """Mark the process dead (`/live` answers 503) after an unrecoverable error, so it is restarted."""
        with self._lock:
            self._failure = reason
        self._update_ready()

    def health(self) -> Health:
        with self._lock:
            m, joined, failure = self._manifest, self._joined, self._failure
        return Health(
            live=failure is None,
            ready=failure is None and m is not None and joined,
            group_joined=joined,
            model_name=m.model_name if m else None,
            model_version=m.model_version if m else None,
            failure=failure,
        )

    @property
    def live(self) -> bool:
        return self.health().live

    @property
    def ready(self) -> bool:
        return self.health().ready

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    def _update_ready(self) -> None:
        self._ready_gauge.set(1 if self.ready else 0)


# -- HTTP -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpEndpoint:
    """Where `serve_http` listens; `port` is the bound one (useful with port 0)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class _Response:
    status: HTTPStatus
    content_type: str
    body: bytes
    extra_headers: tuple[tuple[str, str], ...] = ()

    def encode(self, head_only: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status.value} {self.status.phrase}", f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}", "Connection: close", "Cache-Control: no-store"]
        lines += [f"{k}: {v}" for k, v in self.extra_headers]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def _json(status: HTTPStatus, doc: dict[str, object]) -> _Response:
    return _Response(status, JSON_TYPE, json.dumps(doc).encode() + b"\n")


async def _route(telemetry: PrometheusTelemetry, path: str) -> _Response:
    if path == "/metrics":
        body = await asyncio.to_thread(telemetry.metrics_text)
        return _Response(HTTPStatus.OK, CONTENT_TYPE_LATEST, body)
    health = telemetry.health()
    if path == "/live":
        doc: dict[str, object] = {"live": health.live}
        if health.failure:
            doc["failure"] = health.failure
        return _json(HTTPStatus.OK if health.live else HTTPStatus.SERVICE_UNAVAILABLE, doc)
    if path == "/ready":
        doc = {"ready": health.ready, "group_joined": health.group_joined,
               "model": health.model_name, "model_version": health.model_version}
        return _json(HTTPStatus.OK if health.ready else HTTPStatus.SERVICE_UNAVAILABLE, doc)
    return _json(HTTPStatus.NOT_FOUND, {"error": "not found", "paths": ["/metrics", "/live", "/ready"]})


def _parse_request_line(head: bytes) -> tuple[str, str] | None:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    method, target = parts[0], parts[1]
    return method, target.split("?", 1)[0].split("#", 1)[0]


async def _respond(telemetry: PrometheusTelemetry, head: bytes) -> tuple[_Response, bool]:
    request = _parse_request_line(head)
    if request is None:
        return _json(HTTPStatus.BAD_REQUEST, {"error": "bad request"}), False
    method, path = request
    if method not in ("GET", "HEAD"):
        resp = _json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method not allowed"})
        return _Response(resp.status, resp.content_type, resp.body, (("Allow", "GET, HEAD"),)), False
    return await _route(telemetry, path), method == "HEAD"


async def _serve_one(telemetry: PrometheusTelemetry, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    """One request per connection, then close: probes and scrapers reconnect anyway."""
    try:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            return
        response, head_only = await _respond(telemetry, head)
        writer.write(response.encode(head_only))
        await writer.drain()
    except ConnectionError:
        return
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


@asynccontextmanager
async def serve_http(telemetry: PrometheusTelemetry, host: str, port: int) -> AsyncIterator[HttpEndpoint]:
    """Serve GET /metrics, /live and /ready on host:port until the block exits. Port 0 picks a free port."""
    handlers: set[asyncio.Task[None]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            handlers.add(task)
        try:
            await _serve_one(telemetry, reader, writer)
        finally:
            handlers.discard(task)  # type: ignore[arg-type]

    server = await asyncio.start_server(on_client, host, port, limit=MAX_REQUEST_HEAD)
    try:
        bound_port = server.sockets[0].getsockname()[1]
        yield HttpEndpoint(host=host, port=bound_port)
    finally:
        server.close()
        pending = list(handlers)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()
