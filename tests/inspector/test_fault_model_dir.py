"""A hostile model directory, end to end (issue 13's "done when"): `inspector run` in a subprocess serves a live
stream while every hostile version of tests/helpers/hostile.py appears in its watched model directory — two of
them already there, newest of all, when it starts (the FIFO that hung start-up, the manifest that crash-looped
it), the others one by one while frames flow, each by an atomic rename.

Asserted: the process starts and serves v1; each hostile version is rejected once, with its reason, and counted;
the process's peak RSS grows by less than BOUND_BYTES per version (read from /proc: the high-water mark is reset
before each version and read after its rejection); after each rejection the next frame sent gets its event;
every frame gets exactly one event; a valid v2 published after them all is served (the watcher is not stuck);
SIGTERM ends it with exit 0.

Scale: 32×32-input models and raw frames at RATE per second on 2 partitions, model_poll_s POLL_S.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers.harness import (InspectorProcess, Stream, Tail, logged_at, peak_rss_bytes, record_figures,
                                   reset_peak_rss)
from tests.helpers.hostile import HOSTILE
from tests.helpers.models import export_tiny, version_dir_name, with_version
from tests.helpers.streams import service_settings
from trainer.publish import publish

pytestmark = pytest.mark.kafka

BOUND_BYTES = 600 << 20  # issue 13: peak RSS growth per hostile version
POLL_S = 0.05
RATE = 100.0
AT_START = ("manifest_fifo", "blocks_of_1e6_channels")  # newest of all when the process starts
WHILE_SERVING = tuple(sorted(HOSTILE.keys() - set(AT_START)))  # in this order, each newer than v1 (stamp 1)
STAMPS = {kind: 50 + i for i, kind in enumerate(AT_START)} | {kind: 2 + i for i, kind in enumerate(WHILE_SERVING)}


def entry(kind: str) -> str:
    """The model-directory name of hostile version `kind`."""
    return version_dir_name(STAMPS[kind], kind.replace("_", "-"))


def staged(kind: str, good: Path, staging: Path) -> Path:
    """Hostile version `kind` written in `staging` under its model-directory name, ready to be renamed in."""
    HOSTILE[kind].make(good, staging / entry(kind))
    return staging / entry(kind)


async def until_next_frame_served(stream: Stream, tail: Tail, inspector: InspectorProcess) -> float:
    """Seconds until the first frame sent after now has its event."""
    index = len(stream.frames)
    return await tail.wait_until(
        lambda rs: len(stream.frames) > index and stream.frames[index].frame_id in tail.frames, 30,
        "the next frame's event", alive=inspector.alive)


async def drop(src: Path, models: Path, rejections: int, inspector: InspectorProcess, stream: Stream,
               tail: Tail) -> dict[str, float]:
    """Rename hostile version `src` into `models` and wait for its rejection (the `rejections`-th one); the
    process's peak RSS growth meanwhile, seconds to the rejection, then seconds until the next frame is served."""
    reset_peak_rss(inspector.pid)
    before = peak_rss_bytes(inspector.pid)
    dropped_at = time.time()
    src.rename(models / src.name)
    line = await inspector.wait_for_log("model_rejected", 30, count=rejections)
    growth = peak_rss_bytes(inspector.pid) - before
    assert line["version"] == src.name, (line, src.name)
    return {"rss_mib": round(before / 2**20), "rss_growth_mib": round(growth / 2**20, 1),
            "reject_s": round(logged_at(line) - dropped_at, 3),
            "next_event_s": round(await until_next_frame_served(stream, tail, inspector), 3)}


def test_hostile_versions_never_stop_or_starve_serving(kafka_broker, new_topic, tmp_path):
    good = export_tiny(tmp_path / "good", "v1")
    models, staging = tmp_path / "models", tmp_path / "staging"
    models.mkdir()
    staging.mkdir()
    with_version(good, models / version_dir_name(1, "v1"), "v1")
    for kind in AT_START:
        staged(kind, good, staging).rename(models / entry(kind))
    settings = service_settings(kafka_broker, new_topic(partitions=2), models, model_poll_s=POLL_S, max_batch=8,
                                model_rejects_file=tmp_path / "state" / "rejects.json")
    inspector = InspectorProcess(settings, tmp_path / "run").start()
    per_version: dict[str, dict] = {}

    async def scenario():
        async with Tail(kafka_broker, settings.output_topic) as tail:
            await inspector.wait_for_log("partitions_assigned", 90)
            async with Stream(kafka_broker, settings.topic, RATE) as stream:
                await tail.wait_until(lambda rs: len(rs) >= 20, 30, "the first events", alive=inspector.alive)
                await inspector.wait_for_log("model_rejected", 30, count=len(AT_START))
                for n, kind in enumerate(WHILE_SERVING, start=1):
                    src = await asyncio.to_thread(staged, kind, good, staging)
                    per_version[kind] = await drop(src, models, len(AT_START) + n, inspector, stream, tail)
                rejected_while_serving = await asyncio.to_thread(
                    inspector.metric, "inspector_model_reloads_total", {"result": "failure"})
                v2 = await asyncio.to_thread(publish, with_version(good, staging / "v2", "v2"), models)
                await tail.wait_until(lambda rs: any(d["model"]["version"] == "v2" for d in tail.docs), 30,
                                      "an event from v2", alive=inspector.alive)
                await stream.stop()
                await tail.wait_until(lambda rs: len(tail.frames) >= len(stream.frames), 60,
                                      "an event for every frame", alive=inspector.alive)
                await tail.settle(0.5)
            return list(tail.docs), stream, rejected_while_serving, v2

    try:
        docs, stream, rejected_while_serving, v2 = asyncio.run(scenario())
        code = inspector.terminate()
    finally:
        if inspector.alive():
            inspector.kill()

    assert code == 0
    lines = inspector.lines()
    assert [e for e in lines if "raw" in e or e.get("level") == "error"] == []  # no traceback, no failure
    rejections = [e for e in lines if e.get("event") == "model_rejected"]
    names = {entry(kind): kind for kind in HOSTILE}
    assert sorted(e["version"] for e in rejections) == sorted(names)  # each once, never retried
    for e in rejections:
        assert re.search(HOSTILE[names[e["version"]]].reason, e["reason"]), e
        assert e["serving"] == "v1"
    assert rejected_while_serving == len(HOSTILE)
    assert [e["version"] for e in lines if e.get("event") == "model_swapped"] == ["v2"]

    assert sorted(d["frame_id"] for d in docs) == sorted(f.frame_id for f in stream.frames)  # one event each
    assert {d["model"]["version"] for d in docs} == {"v1", "v2"}
    over = {k: v for k, v in per_version.items() if v["rss_growth_mib"] * 2**20 >= BOUND_BYTES}
    assert over == {}, over

    inferred = sorted(datetime.fromisoformat(d["times"]["inferred_at"]) for d in docs)
    gaps = [(b - a).total_seconds() for a, b in zip(inferred, inferred[1:])]
    record_figures("hostile_model_dir_live", {
        "frames": len(stream.frames), "events": len(docs), "rate_fps": RATE, "model_poll_s": POLL_S,
        "hostile_versions": len(HOSTILE), "at_start": list(AT_START), "rejections_counted": int(rejected_while_serving),
        "served_v2_from": v2.name, "per_version": per_version,
        "max_rss_growth_mib": max(v["rss_growth_mib"] for v in per_version.values()),
        "max_reject_s": max(v["reject_s"] for v in per_version.values()),
        "max_next_event_s": max(v["next_event_s"] for v in per_version.values()),
        "longest_gap_between_events_s": round(max(gaps), 3),
    })
