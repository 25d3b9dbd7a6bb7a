"""Hot reload on the local broker during a live stream: a swap loses no frame, every event names the old or
the new version (and per partition, in offset order, never the old one after the new one), the switch
comes within the poll interval plus the measured validation/warm-up time; broken checkpoints are rejected
once each while the old model keeps serving; quick successive publishes end on the newest.

Scale: 32×32-input models and raw frames streamed at 150 frames/s on 2 partitions, model_poll_s 0.2.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from structlog.testing import capture_logs

from inspector.metrics import Metrics
from inspector.model_store import ModelStore
from inspector.runners import Loader
from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
from stripnet.checkpoint import sha256_file
from tests.helpers.harness import Stream, Tail, record_figures
from tests.helpers.models import export_tiny, version_dir_name, with_version
from tests.helpers.streams import committed_positions, end_positions, running_service, service_settings
from trainer.publish import publish

pytestmark = pytest.mark.kafka

POLL_S = 0.2
MAX_BATCH = 8
MAX_WAIT_MS = 5.0
RATE = 150.0
SLACK_S = 1.0  # event-loop and thread scheduling on a loaded 2-core machine; everything else is measured


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("ckpt") / "base", "v1")


@pytest.fixture
def model_dir(tmp_path, base_checkpoint) -> Path:
    """A watched model directory holding version v1."""
    models = tmp_path / "models"
    models.mkdir()
    with_version(base_checkpoint, models / version_dir_name(0, "v1"), "v1")
    return models


# -- measuring what the store and the engine do --------------------------------------------------------

@dataclass(frozen=True)
class Poll:
    ended_at: datetime
    seconds: float
    version: str | None


class TimedStore:
    """The service's model store, with every poll timed (validation + warm-up included)."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store
        self.polls: list[Poll] = []

    def load_initial(self):
        return self._store.load_initial()

    def poll(self):
        started = time.perf_counter()
        found = self._store.poll()
        self.polls.append(Poll(datetime.now(UTC), time.perf_counter() - started, found.version if found else None))
        return found


def longest_inference_s(metrics: Metrics) -> float:
    """An upper bound of the longest batch inference so far: the smallest histogram bucket holding them all."""
    total = metrics.registry.get_sample_value("inspector_inference_seconds_count")
    buckets = sorted((float(s.labels["le"]), s.value) for family in metrics.registry.collect()
                     for s in family.samples if s.name == "inspector_inference_seconds_bucket")
    return next(le for le, count in buckets if count >= total)


def timed_store(settings, model_dir: Path, metrics: Metrics, prepare_seconds: list[float]) -> TimedStore:
    """The service's model store on the service's runner loader, each load timed (validation + warm-up)."""
    load = Loader(settings).load

    def timed(model, manifest):
        started = time.perf_counter()
        try:
            return load(model, manifest)
        finally:
            prepare_seconds.append(time.perf_counter() - started)

    return TimedStore(ModelStore(model_dir, timed, metrics=metrics))


def settings_for(kafka_broker, new_topic, models, **overrides):
    return service_settings(kafka_broker, new_topic(partitions=2), models, model_poll_s=POLL_S, max_batch=MAX_BATCH,
                            max_wait_ms=MAX_WAIT_MS, **overrides)


# -- checks shared by the tests -------------------------------------------------------------------------

async def finish(stream: Stream, tail: Tail, settings) -> dict:
    """Stop the stream, wait for an event per frame, return the committed positions after a clean stop."""
    await stream.stop()
    await tail.wait_until(lambda rs: len(tail.frames) >= len(stream.frames), 60, "an event for every frame")
    return end_positions(stream.acks)


def assert_one_event_per_frame(stream: Stream, docs: list[dict]) -> None:
    assert sorted(d["frame_id"] for d in docs) == sorted(f.frame_id for f in stream.frames)


def versions_in_offset_order(docs: list[dict]) -> dict[int, list[str]]:
    by_partition: dict[int, list[tuple[int, str]]] = {}
    for d in docs:
        by_partition.setdefault(d["source"]["partition"], []).append((d["source"]["offset"], d["model"]["version"]))
    return {p: [v for _, v in sorted(pairs)] for p, pairs in by_partition.items()}


def assert_never_back(docs: list[dict], order: list[str]) -> None:
    """Per partition, in offset order, the versions only move forward along `order`."""
    for partition, versions in versions_in_offset_order(docs).items():
        ranks = [order.index(v) for v in versions]
        assert ranks == sorted(ranks), f"partition {partition} went back to an older version"


async def assert_committed(settings, ends: dict[int, int]) -> None:
    committed = await committed_positions(settings.bootstrap_servers, settings.topic, settings.group_id)
    assert {p: c for p, c in committed.items() if c is not None} == ends


# -- the tests ------------------------------------------------------------------------------------------

def test_a_swap_during_a_live_stream_loses_no_frame_and_comes_within_poll_plus_warm_up(
        kafka_broker, new_topic, model_dir, base_checkpoint, tmp_path):
    # one inference thread, so batches finish in swap order (with two, a v1 batch can finish after a v2 one)
    settings = settings_for(kafka_broker, new_topic, model_dir, inference_workers=1)
    staged = with_version(base_checkpoint, tmp_path / "staged-v2", "v2")
    prepare_seconds: list[float] = []
    metrics = Metrics()
    store = timed_store(settings, model_dir, metrics, prepare_seconds)

    async def scenario():
        async with (Tail(kafka_broker, settings.output_topic) as tail,
                    running_service(settings, metrics=metrics, models=store) as run):
            async with Stream(kafka_broker, settings.topic, RATE) as stream:
                await tail.wait_until(lambda rs: len(rs) >= 100, 30, "100 events from v1")
                published_at = datetime.now(UTC)
                await asyncio.to_thread(publish, staged, model_dir)
                published_done = datetime.now(UTC)
                async with asyncio.timeout(30):
                    while run.service.serving.version != "v2":
                        await asyncio.sleep(0.01)
                await tail.wait_until(lambda rs: sum(d["model"]["version"] == "v2" for d in tail.docs) >= 100, 30,
                                      "100 events from v2")
                ends = await finish(stream, tail, settings)
            return list(tail.docs), stream, published_at, published_done, ends

    docs, stream, published_at, published_done, ends = asyncio.run(scenario())
    asyncio.run(assert_committed(settings, ends))

    assert_one_event_per_frame(stream, docs)
    assert {d["model"]["version"] for d in docs} == {"v1", "v2"}
    assert_never_back(docs, ["v1", "v2"])

    # the switch: from the publish to the first frame inferred by v2
    first_v2 = min(datetime.fromisoformat(d["times"]["inferred_at"]) for d in docs if d["model"]["version"] == "v2")
    last_v1 = max(datetime.fromisoformat(d["times"]["inferred_at"]) for d in docs if d["model"]["version"] == "v1")
    switch_s = (first_v2 - published_done).total_seconds()
    swap_poll = next(p for p in store.polls if p.version == "v2")
    polls_waited = [p for p in store.polls if published_at < p.ended_at <= swap_poll.ended_at]
    bound = (POLL_S + sum(p.seconds for p in polls_waited) + MAX_WAIT_MS / 1000 + 2 * longest_inference_s(metrics)
             + SLACK_S)
    assert 0 < switch_s <= bound, f"switch took {switch_s:.3f}s; poll {POLL_S}s + polls {polls_waited} + one batch"
    assert last_v1 <= first_v2, "one inference thread: no v1 batch after the first v2 batch"

    record_figures("hot_reload_swap", {
        "frames": len(stream.frames), "events": len(docs), "rate_fps": RATE, "model_poll_s": POLL_S,
        "events_v1": sum(d["model"]["version"] == "v1" for d in docs),
        "events_v2": sum(d["model"]["version"] == "v2" for d in docs),
        "swap_poll_s": round(swap_poll.seconds, 3), "warm_up_s": round(prepare_seconds[-1], 3),
        "publish_s": round((published_done - published_at).total_seconds(), 3),
        "switch_s": round(switch_s, 3), "switch_bound_s": round(bound, 3),
        "max_batch_inference_bound_s": longest_inference_s(metrics),
    })


def break_checkpoints(good: Path, staging: Path) -> dict[str, tuple[Path, str]]:
    """Broken copies of `good` -> (directory, what the rejection reason must mention)."""
    def copy(name: str) -> Path:
        return with_version(good, staging / name, name)

    def reseal(ckpt: Path) -> None:  # make the manifest's sha256 match whatever the weights now are
        manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
        manifest["weights_sha256"] = sha256_file(ckpt / WEIGHTS_NAME)
        (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))

    out: dict[str, tuple[Path, str]] = {}
    weights = (good / WEIGHTS_NAME).read_bytes()

    ckpt = copy("bitflip")  # a flipped bit in the tensor data, as a bad disk or copy would do
    (ckpt / WEIGHTS_NAME).write_bytes(weights[:-100] + bytes([weights[-100] ^ 0x10]) + weights[-99:])
    out["bitflip"] = (ckpt, "does not match")

    ckpt = copy("garbled")  # a corrupt safetensors header, with a manifest that vouches for it
    header_len = struct.unpack("<Q", weights[:8])[0]
    (ckpt / WEIGHTS_NAME).write_bytes(weights[:8] + b"\x00\xff" * (header_len // 2) + weights[8 + header_len:])
    reseal(ckpt)
    out["garbled"] = (ckpt, "unreadable safetensors")

    ckpt = copy("truncated")
    (ckpt / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    out["truncated"] = (ckpt, "does not match")

    ckpt = copy("truncsealed")  # truncated, and the sha256 recomputed: only the parser can tell
    (ckpt / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    reseal(ckpt)
    out["truncsealed"] = (ckpt, "unreadable safetensors")

    ckpt = copy("wrongsha")
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["weights_sha256"] = "0" * 64
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))
    out["wrongsha"] = (ckpt, "does not match")

    ckpt = copy("badmanifest")
    (ckpt / MANIFEST_NAME).write_text('{"model_name": "t", "model_version": ')
    out["badmanifest"] = (ckpt, "invalid manifest")

    ckpt = copy("fiveclasses")  # the manifest names 5 classes, the weights have 6 outputs
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    manifest["class_names"] = manifest["class_names"][:5]
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))
    out["fiveclasses"] = (ckpt, "do not fit architecture")

    ckpt = copy("nan")  # well-formed and sealed, but it computes NaN: only the warm-up can tell
    state = load_file(ckpt / WEIGHTS_NAME)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, ckpt / WEIGHTS_NAME)
    reseal(ckpt)
    out["nan"] = (ckpt, "non-finite")
    return out


def test_broken_checkpoints_are_rejected_once_each_while_the_old_model_serves_on(
        kafka_broker, new_topic, model_dir, base_checkpoint, tmp_path):
    settings = settings_for(kafka_broker, new_topic, model_dir)
    broken = break_checkpoints(base_checkpoint, tmp_path / "staging")
    metrics = Metrics()
    store = timed_store(settings, model_dir, metrics, [])
    failures = lambda: metrics.registry.get_sample_value("inspector_model_reloads_total", {"result": "failure"})  # noqa: E731
    partial = model_dir / version_dir_name(99, "v2")  # a non-atomic `cp -r` caught half-way: newest of all

    async def scenario():
        async with (Tail(kafka_broker, settings.output_topic) as tail,
                    running_service(settings, metrics=metrics, models=store) as run):
            async with Stream(kafka_broker, settings.topic, RATE) as stream:
                await tail.wait_until(lambda rs: len(rs) >= 50, 30, "the first events")
                for stamp, (name, (ckpt, _)) in enumerate(broken.items(), start=1):
                    ckpt.rename(model_dir / version_dir_name(stamp, name))  # each appears whole, atomically
                    await asyncio.sleep(2 * POLL_S)
                # a copy caught half-way (manifest there, weights not yet); each of its two states appears at
                # once, so the store sees exactly one incomplete state and then the complete one
                staged = tmp_path / "staging" / "partial"
                staged.mkdir()
                manifest = json.loads((base_checkpoint / MANIFEST_NAME).read_text()) | {"model_version": "v2"}
                (staged / MANIFEST_NAME).write_text(json.dumps(manifest))
                staged.rename(partial)
                polls_before = len(store.polls)
                while len(store.polls) < polls_before + 10:  # ten more polls: nothing is tried twice
                    await asyncio.sleep(POLL_S / 2)
                rejected_while_serving = failures()
                still = run.service.serving.version
                shutil.copy(base_checkpoint / WEIGHTS_NAME, tmp_path / "staging" / WEIGHTS_NAME)
                (tmp_path / "staging" / WEIGHTS_NAME).rename(partial / WEIGHTS_NAME)  # the copy completes
                async with asyncio.timeout(30):
                    while run.service.serving.version != "v2":
                        await asyncio.sleep(0.02)
                await tail.wait_until(lambda rs: any(d["model"]["version"] == "v2" for d in tail.docs), 30,
                                      "an event from v2")
                ends = await finish(stream, tail, settings)
            return list(tail.docs), stream, ends, rejected_while_serving, still

    with capture_logs() as logs:
        docs, stream, ends, rejected_while_serving, still = asyncio.run(scenario())
    asyncio.run(assert_committed(settings, ends))

    assert still == "v1"
    assert rejected_while_serving == len(broken) + 1  # the eight broken ones and the partial copy, once each
    assert failures() == len(broken) + 1
    assert metrics.registry.get_sample_value("inspector_model_reloads_total", {"result": "success"}) == 2
    rejections = {}
    for entry in logs:
        if entry["event"] == "model_rejected":
            assert entry["version"] not in rejections, f"{entry['version']} was tried twice"
            rejections[entry["version"]] = entry["reason"]
    for stamp, (name, (_, mentions)) in enumerate(broken.items(), start=1):
        assert mentions in rejections[version_dir_name(stamp, name)], rejections[version_dir_name(stamp, name)]
    assert "missing" in rejections[partial.name]

    assert_one_event_per_frame(stream, docs)
    assert {d["model"]["version"] for d in docs} == {"v1", "v2"}
    assert_never_back(docs, ["v1", "v2"])
    record_figures("hot_reload_bad_checkpoints", {
        "frames": len(stream.frames), "events": len(docs), "broken_versions": len(broken) + 1,
        "rejections_counted": int(failures()), "polls": len(store.polls),
        "reasons": {name: reason.replace(f"{model_dir}/", "") for name, reason in sorted(rejections.items())},
        "events_v1": sum(d["model"]["version"] == "v1" for d in docs),
    })


PAUSES_S = (0.0, 1.5 * POLL_S, 0.0, 1.5 * POLL_S, 0.0)


def test_quick_successive_publishes_end_on_the_newest(kafka_broker, new_topic, model_dir, base_checkpoint, tmp_path):
    settings = settings_for(kafka_broker, new_topic, model_dir)
    versions = ["v1", "v2", "v3", "v4", "v5", "v6"]
    staged = [with_version(base_checkpoint, tmp_path / f"staged-{v}", v) for v in versions[1:]]
    metrics = Metrics()
    store = timed_store(settings, model_dir, metrics, [])

    async def scenario():
        async with (Tail(kafka_broker, settings.output_topic) as tail,
                    running_service(settings, metrics=metrics, models=store) as run):
            async with Stream(kafka_broker, settings.topic, RATE) as stream:
                await tail.wait_until(lambda rs: len(rs) >= 50, 30, "the first events")
                started = time.monotonic()
                for ckpt, pause in zip(staged, PAUSES_S, strict=True):  # some faster than a poll, some not
                    await asyncio.to_thread(publish, ckpt, model_dir)
                    await asyncio.sleep(pause)
                publishing_s = time.monotonic() - started
                async with asyncio.timeout(30):
                    while run.service.serving.version != "v6":
                        await asyncio.sleep(0.02)
                await asyncio.sleep(5 * POLL_S)  # and it stays there
                final = run.service.serving.version
                ends = await finish(stream, tail, settings)
            return list(tail.docs), stream, ends, final, publishing_s

    docs, stream, ends, final, publishing_s = asyncio.run(scenario())
    asyncio.run(assert_committed(settings, ends))
    assert final == "v6"
    activated = [p.version for p in store.polls if p.version is not None]
    assert activated[-1] == "v6" and activated == sorted(activated), activated
    assert_one_event_per_frame(stream, docs)
    assert {d["model"]["version"] for d in docs} <= set(versions)
    assert_never_back(docs, versions)
    last_per_partition = {p: vs[-1] for p, vs in versions_in_offset_order(docs).items()}
    assert set(last_per_partition.values()) == {"v6"}
    record_figures("hot_reload_quick_publishes", {
        "publishes": len(staged), "publishing_s": round(publishing_s, 3), "activated": activated,
        "frames": len(stream.frames), "events": len(docs),
    })
