"""/metrics, /live and /ready over real HTTP, from the one metrics object."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inspector.endpoints import serve_http
from inspector.metrics import Metrics
from schemas.checkpoint import ArchitectureSpec, BlockSpec, Manifest
from tests.helpers.http import http_get

MANIFEST = Manifest(model_name="kd-eg-repvgg", model_version="v3", class_names=("a", "b"), weights_sha256="ab" * 32,
                    parameters=1, macs=1, created_at=datetime(2024, 1, 1, tzinfo=UTC),
                    architecture=ArchitectureSpec(name="t", blocks=(BlockSpec(out_channels=8, stride=2),),
                                                  activation="gelu", attention="eca"))


async def fetch(base: str, path: str, method: str = "GET") -> tuple[int | None, dict[str, str], bytes]:
    # A blocking client in a thread: the server must keep answering from the event loop meanwhile.
    return await asyncio.to_thread(http_get, base + path, method)


def test_metrics_is_the_prometheus_text_of_the_registry() -> None:
    metrics = Metrics()

    async def scenario() -> tuple[int | None, dict[str, str], bytes]:
        async with serve_http(metrics, "127.0.0.1", 0) as endpoint:
            metrics.frames_consumed("strip.frames", 1, 3)
            return await fetch(endpoint.url, "/metrics")

    status, headers, body = asyncio.run(scenario())
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert values[("inspector_frames_consumed_total", (("partition", "1"), ("topic", "strip.frames")))] == 3


def test_ready_and_live_follow_the_health_state() -> None:
    metrics = Metrics()

    async def scenario() -> list[tuple[int | None, dict]]:
        seen = []
        async with serve_http(metrics, "127.0.0.1", 0) as endpoint:
            async def probe(path: str) -> None:
                status, headers, body = await fetch(endpoint.url, path)
                assert headers["Content-Type"].startswith("application/json")
                seen.append((status, json.loads(body)))

            await probe("/ready")
            metrics.model_active(MANIFEST)
            metrics.group_joined(True)
            await probe("/ready")
            await probe("/live")
            metrics.failed("engine thread died")
            await probe("/live")
            await probe("/ready")
        return seen

    seen = asyncio.run(scenario())
    assert seen[0] == (503, {"ready": False, "group_joined": False, "model": None, "model_version": None})
    assert seen[1] == (200, {"ready": True, "group_joined": True, "model": "kd-eg-repvgg", "model_version": "v3"})
    assert seen[2] == (200, {"live": True})
    assert seen[3] == (503, {"live": False, "failure": "engine thread died"})
    assert seen[4][0] == 503


def test_other_paths_methods_and_garbage_get_http_answers_and_the_server_stays_up() -> None:
    async def raw(port: int, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        reply = await reader.read()
        writer.close()
        return reply

    async def scenario() -> dict[str, object]:
        async with serve_http(Metrics(), "127.0.0.1", 0) as endpoint:
            return {"404": await fetch(endpoint.url, "/nope"), "query": await fetch(endpoint.url, "/live?verbose=1"),
                    "head": await fetch(endpoint.url, "/metrics", method="HEAD"),
                    "post": await fetch(endpoint.url, "/metrics", method="POST"),
                    "garbage": await raw(endpoint.port, b"hello\r\n\r\n"), "up": await fetch(endpoint.url, "/live")}

    r = asyncio.run(scenario())
    assert r["404"][0] == 404 and r["query"][0] == 200 and r["up"][0] == 200
    assert r["head"][0] == 200 and r["head"][2] == b""
    assert r["post"][0] == 405 and "GET" in r["post"][1]["Allow"]
    assert r["garbage"].split(b" ", 2)[1] == b"400"


def test_the_bound_address_is_reported_and_released_and_a_silent_client_does_not_hold_up_the_exit() -> None:
    async def scenario() -> tuple[str, int, int | None]:
        async with serve_http(Metrics(), "127.0.0.1", 0) as endpoint:
            host, port = endpoint.host, endpoint.port
            _, idle = await asyncio.open_connection(host, port)  # connects, never sends
            status, _, _ = await fetch(endpoint.url, "/metrics")
        idle.close()
        with pytest.raises(OSError):
            await asyncio.open_connection(host, port)
        return host, port, status

    host, port, status = asyncio.run(asyncio.wait_for(scenario(), timeout=4))
    assert host == "127.0.0.1" and port > 0 and status == 200
