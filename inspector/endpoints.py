"""`GET /metrics`, `/live` and `/ready`, served by aiohttp from the one metrics object.

`/metrics` is the Prometheus text (rendered in a worker thread, so a scrape never stalls the event
loop); `/live` answers 503 once the service has failed, `/ready` 200 only while a model is active
and the consumer holds partitions. aiohttp answers HEAD, 404, 405 and malformed requests itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from inspector.metrics import Metrics

PATHS = ("/metrics", "/live", "/ready")
SHUTDOWN_TIMEOUT_S = 1.0  # probes and scrapes are short; an idle keep-alive client must not hold up the exit


@dataclass(frozen=True)
class Endpoint:
    """Where the server listens: the address the socket is actually bound to (the port is the OS's
    choice when the settings say 0)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def make_app(metrics: Metrics) -> web.Application:
    async def render(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(metrics.render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(_: web.Request) -> web.Response:
        health = metrics.health()
        doc: dict[str, object] = {"live": health.live} | ({"failure": health.failure} if health.failure else {})
        return web.json_response(doc, status=200 if health.live else 503)

    async def ready(_: web.Request) -> web.Response:
        health = metrics.health()
        doc = {"ready": health.ready, "group_joined": health.group_joined, "model": health.model_name,
               "model_version": health.model_version}
        return web.json_response(doc, status=200 if health.ready else 503)

    app = web.Application()
    app.add_routes([web.get("/metrics", render), web.get("/live", live), web.get("/ready", ready)])
    return app


@asynccontextmanager
async def serve_http(metrics: Metrics, host: str, port: int) -> AsyncIterator[Endpoint]:
    """Serve the three paths on host:port until the block exits; port 0 lets the OS pick a free port."""
    runner = web.AppRunner(make_app(metrics), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield Endpoint(host=bound_host, port=bound_port)
    finally:
        await runner.cleanup()
