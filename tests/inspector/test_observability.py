"""The metrics and health endpoint, driven through the Telemetry methods the service calls."""

from __future__ import annotations

import asyncio
import inspect
import json
import urllib.error
import urllib.request
from datetime import datetime, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inspector.observability import PrometheusTelemetry, serve_http
from inspector.telemetry import Telemetry
from schemas.checkpoint import ArchitectureSpec, BlockSpec, Manifest

SHA = "ab" * 32


def make_manifest(version: str = "v1") -> Manifest:
    arch = ArchitectureSpec(name="t", blocks=(BlockSpec(out_channels=8, stride=2),), activation="gelu",
                            attention="eca")
    return Manifest(model_name="kd-eg-repvgg", model_version=version, architecture=arch,
                    class_names=("a", "b"), weights_sha256=SHA, parameters=1, macs=1,
                    created_at=datetime(2024, 1, 1, tzinfo=timezone.utc))


def http_get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def fetch(base: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    # A blocking client in a thread: the server must keep answering from the event loop meanwhile.
    return await asyncio.to_thread(http_get, base + path, method)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_implements_every_telemetry_method_with_the_same_signature() -> None:
    names = [n for n, v in inspect.getmembers(Telemetry) if inspect.isfunction(v) and not n.startswith("_")]
    assert "batch_done" in names and "group_joined" in names
    for name in names:
        ours = inspect.signature(getattr(PrometheusTelemetry, name))
        theirs = inspect.signature(getattr(Telemetry, name))
        assert list(ours.parameters) == list(theirs.parameters), name


def test_each_instance_has_its_own_registry() -> None:
    a, b = PrometheusTelemetry(), PrometheusTelemetry()
    a.events_produced(3)
    assert samples(a.metrics_text())[("inspector_events_produced_total", ())] == 3
    assert samples(b.metrics_text())[("inspector_events_produced_total", ())] == 0


def test_metrics_endpoint_reflects_telemetry_calls() -> None:
    telemetry = PrometheusTelemetry()

    async def scenario() -> tuple[bytes, bytes, dict[str, str]]:
        async with serve_http(telemetry, "127.0.0.1", 0) as endpoint:
            assert endpoint.port > 0
            status, headers, before = await fetch(endpoint.url, "/metrics")
            assert status == 200
            telemetry.frames_consumed("strip.frames", 2, 5)
            telemetry.frames_consumed("strip.frames", 2, 3)
            telemetry.events_produced(7)
            telemetry.dead_lettered("decode_error")
            telemetry.batch_done(8, queue_wait_s=0.004, inference_s=0.02)
            telemetry.event_latency(0.3)
            telemetry.event_latency(-0.01)  # producer clock ahead of ours
            telemetry.consumer_lag("strip.frames", 2, 42)
            telemetry.model_active(make_manifest("v7"))
            telemetry.model_reload(True)
            telemetry.model_reload(False, "sha256 mismatch")
            telemetry.model_reload(False, "non-finite output")
            status, headers, after = await fetch(endpoint.url, "/metrics")
            assert status == 200
            return before, after, headers

    before, after, headers = asyncio.run(scenario())
    assert headers["Content-Type"].startswith("text/plain")
    b, a = samples(before), samples(after)
    frames = ("inspector_frames_consumed_total", (("partition", "2"), ("topic", "strip.frames")))
    assert frames not in b and a[frames] == 8
    assert b[("inspector_events_produced_total", ())] == 0 and a[("inspector_events_produced_total", ())] == 7
    assert a[("inspector_dead_lettered_total", (("reason", "decode_error"),))] == 1
    assert a[("inspector_batch_size_count", ())] == 1 and a[("inspector_batch_size_sum", ())] == 8
    assert a[("inspector_batch_size_bucket", (("le", "8.0"),))] == 1
    assert a[("inspector_batch_size_bucket", (("le", "4.0"),))] == 0
    assert a[("inspector_queue_wait_seconds_sum", ())] == pytest.approx(0.004)
    assert a[("inspector_inference_seconds_sum", ())] == pytest.approx(0.02)
    assert a[("inspector_event_latency_seconds_count", ())] == 2
    assert a[("inspector_event_latency_seconds_sum", ())] == pytest.approx(0.3)
    assert a[("inspector_consumer_lag", (("partition", "2"), ("topic", "strip.frames")))] == 42
    info = ("inspector_model_info", (("name", "kd-eg-repvgg"), ("sha256", SHA), ("version", "v7")))
    assert a[info] == 1
    assert b[("inspector_model_reloads_total", (("result", "failure"),))] == 0
    assert a[("inspector_model_reloads_total", (("result", "success"),))] == 1
    assert a[("inspector_model_reloads_total", (("result", "failure"),))] == 2


def test_model_info_shows_only_the_active_version() -> None:
    telemetry = PrometheusTelemetry()
    telemetry.model_active(make_manifest("v1"))
    telemetry.model_active(make_manifest("v2"))
    versions = [dict(labels)["version"] for (name, labels), value in samples(telemetry.metrics_text()).items()
                if name == "inspector_model_info" and value == 1]
    assert versions == ["v2"]


def test_lag_of_revoked_partitions_is_dropped_when_the_group_is_left() -> None:
    telemetry = PrometheusTelemetry()
    telemetry.group_joined(True)
    telemetry.consumer_lag("strip.frames", 0, 10)
    telemetry.group_joined(False)
    assert not any(name == "inspector_consumer_lag" for name, _ in samples(telemetry.metrics_text()))


def test_ready_flips_when_a_model_is_active_and_the_group_is_joined() -> None:
    telemetry = PrometheusTelemetry()

    async def scenario() -> list[tuple[int, dict]]:
        seen = []
        async with serve_http(telemetry, "127.0.0.1", 0) as endpoint:
            async def ready() -> None:
                status, headers, body = await fetch(endpoint.url, "/ready")
                assert headers["Content-Type"] == "application/json"
                seen.append((status, json.loads(body)))

            await ready()
            telemetry.model_active(make_manifest("v3"))
            await ready()
            telemetry.group_joined(True)
            await ready()
            telemetry.group_joined(False)  # rebalance: partitions revoked
            await ready()
        return seen

    seen = asyncio.run(scenario())
    assert [status for status, _ in seen] == [503, 503, 200, 503]
    assert seen[0][1] == {"ready": False, "group_joined": False, "model": None, "model_version": None}
    assert seen[2][1] == {"ready": True, "group_joined": True, "model": "kd-eg-repvgg", "model_version": "v3"}
    assert telemetry.ready is False and telemetry.live is True


def test_live_answers_200_until_the_service_marks_itself_failed() -> None:
    telemetry = PrometheusTelemetry()
    telemetry.model_active(make_manifest())
    telemetry.group_joined(True)

    async def scenario() -> list[tuple[int, dict]]:
        async with serve_http(telemetry, "127.0.0.1", 0) as endpoint:
            first = await fetch(endpoint.url, "/live")
            telemetry.set_failed("engine thread died")
            second = await fetch(endpoint.url, "/live")
            ready = await fetch(endpoint.url, "/ready")
        return [(s, json.loads(body)) for s, _, body in (first, second, ready)]

    (s1, live1), (s2, live2), (s3, ready) = asyncio.run(scenario())
    assert (s1, live1) == (200, {"live": True})
    assert (s2, live2) == (503, {"live": False, "failure": "engine thread died"})
    assert s3 == 503 and ready["ready"] is False


def test_unknown_paths_methods_and_garbage() -> None:
    telemetry = PrometheusTelemetry()

    async def raw(port: int, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        reply = await reader.read()
        writer.close()
        await writer.wait_closed()
        return reply

    async def scenario() -> dict[str, object]:
        async with serve_http(telemetry, "127.0.0.1", 0) as endpoint:
            return {
                "404": await fetch(endpoint.url, "/nope"),
                "query": await fetch(endpoint.url, "/live?verbose=1"),
                "head": await fetch(endpoint.url, "/metrics", method="HEAD"),
                "post": await fetch(endpoint.url, "/metrics", method="POST"),
                "garbage": await raw(endpoint.port, b"hello\r\n\r\n"),
                "still_up": await fetch(endpoint.url, "/live"),
            }

    r = asyncio.run(scenario())
    assert r["404"][0] == 404 and json.loads(r["404"][2])["error"] == "not found"
    assert r["query"][0] == 200
    assert r["head"][0] == 200 and r["head"][2] == b""
    assert r["post"][0] == 405 and r["post"][1]["Allow"] == "GET, HEAD"
    assert r["garbage"].startswith(b"HTTP/1.1 400 ")
    assert r["still_up"][0] == 200


def test_a_silent_client_does_not_stop_other_requests_or_shutdown() -> None:
    telemetry = PrometheusTelemetry()

    async def scenario() -> int:
        async with serve_http(telemetry, "127.0.0.1", 0) as endpoint:
            _, idle = await asyncio.open_connection("127.0.0.1", endpoint.port)  # connects, never sends
            status, _, _ = await fetch(endpoint.url, "/metrics")
        # Leaving the block cancelled the idle connection's handler instead of waiting for its timeout.
        idle.close()
        return status

    assert asyncio.run(asyncio.wait_for(scenario(), timeout=4)) == 200


def test_port_is_released_after_the_block() -> None:
    telemetry = PrometheusTelemetry()

    async def scenario() -> None:
        async with serve_http(telemetry, "127.0.0.1", 0) as endpoint:
            port = endpoint.port
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(scenario())
