"""SIGKILL at random points of a 5,000-frame stream, three times, each time restarted: every frame still
gets an event, no restart re-processes a committed frame, the duplicates are frames that were in flight
at a kill (emitted, not yet committed) and stay within the in-flight budget, and event_id lets a consumer
drop them.

Scale: 5,000 raw 32×32 frames (1 KiB each) on 3 partitions, a 32×32-input model, max_batch 16,
queue_frames 128. The stream arrives in four parts of 1,250 frames, one before each (re)start, so every
run has work (at ~2,000 frames/s a whole stream is gone in a blink). The kill points are random event
counts inside the part being processed, drawn from RELIABILITY_SEED (printed with the figures) or a fresh
seed.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from schemas.messages import event_id_for
from tests.helpers.harness import InspectorProcess, Tail, record_figures
from tests.helpers.models import export_tiny, version_dir_name
from tests.helpers.streams import (
    FRAME_SIZE, committed_positions, create_topics, end_positions, produce, raw_frames, service_settings,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

FRAMES = 5000
KILLS = 3
MAX_BATCH = 16
QUEUE_FRAMES = 128


def in_flight_bound(queue_frames: int) -> int:
    """Most frames whose events can be out while their offsets are not committed, from the design: the
    source never holds more than `queue_frames` fetched-and-uncommitted records, and the commit policy
    removes a finished prefix from that count when it sends the commit, so a commit still in flight when
    the process dies can hold up to another `queue_frames`."""
    return 2 * queue_frames


STAGE = FRAMES // (KILLS + 1)  # the stream arrives in four parts, one before each (re)start


def kill_points(rng: random.Random) -> list[int]:
    """For run k (k < 3), a random count of distinct frames with events inside part k of the stream, so the
    kill comes while that part is being worked on and the next run always has the next part to do."""
    return [rng.randint(k * STAGE + 200, (k + 1) * STAGE - 300) for k in range(KILLS)]


def test_sigkill_three_times_mid_stream_loses_no_frame(kafka_broker, new_topic, tmp_path):
    seed = int(os.environ.get("RELIABILITY_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    thresholds = kill_points(rng)
    models = tmp_path / "models"
    export_tiny(models / version_dir_name(0, "v1"), "v1")
    settings = service_settings(kafka_broker, new_topic(partitions=3), models, max_batch=MAX_BATCH,
                                queue_frames=QUEUE_FRAMES, max_wait_ms=5.0)
    create_topics(kafka_broker, {settings.output_topic: 1, settings.dead_letter_topic: 1})
    frames = raw_frames(FRAMES, cameras=4, size=FRAME_SIZE)
    by_id = {f.frame_id: f for f in frames}

    started: list[InspectorProcess] = []

    async def scenario():
        acks = []
        kills: list[dict] = []  # per kill: wall-clock time, committed positions after it, restart timing
        async with Tail(kafka_broker, settings.output_topic) as tail:
            for k in range(KILLS + 1):
                acks += await produce(kafka_broker, settings.topic, frames[k * STAGE:(k + 1) * STAGE])
                process = InspectorProcess(settings, tmp_path, name=f"run{k}").start()
                started.append(process)
                if k:
                    kills[k - 1]["restart_to_first_event_s"] = round(await tail.wait_until(
                        fetched_after(tail, kills[k - 1]["at"]), 120, f"run {k}'s first event",
                        alive=process.alive), 2)
                if k == KILLS:
                    await tail.wait_until(lambda rs: len(tail.frames) == FRAMES, 120, "an event for every frame",
                                          alive=process.alive)
                    assert process.terminate() == 0
                    break
                await tail.wait_until(lambda rs: len(tail.frames) >= thresholds[k], 120, f"kill point {k}",
                                      alive=process.alive)
                await asyncio.sleep(rng.uniform(0, 0.05))
                process.kill()
                kills.append({"at": datetime.now(UTC), "distinct_at_kill": len(tail.frames),
                              "committed": await committed_positions(kafka_broker, settings.topic, settings.group_id)})
            await tail.settle()
            final = await committed_positions(kafka_broker, settings.topic, settings.group_id)
            return list(tail.docs), kills, end_positions(acks), final

    began = time.monotonic()
    try:
        events, kills, ends, final = asyncio.run(scenario())
    finally:
        for process in started:
            if process.alive():
                process.kill()
    elapsed = time.monotonic() - began

    # every frame has at least one event, every event is for a frame of the stream, made by v1
    per_frame = Counter(e["frame_id"] for e in events)
    assert set(per_frame) == set(by_id), f"lost: {sorted(set(by_id) - set(per_frame))[:10]}"
    assert all(e["model"]["version"] == "v1" for e in events)
    assert final == {p: ends.get(p) for p in final}, "the last run committed the whole stream"

    # event ids: the same frame always gets the same id, so dropping repeated ids leaves one event per frame
    for e in events:
        assert e["event_id"] == str(event_id_for(e["camera_id"], e["frame_id"], "v1"))
    assert len({e["event_id"] for e in events}) == FRAMES

    # runs: an event belongs to the run that fetched its frame (runs never overlap in time)
    def run_of(event) -> int:
        received = datetime.fromisoformat(event["times"]["received_at"])
        return sum(received > kill["at"] for kill in kills)

    runs = [[e for e in events if run_of(e) == r] for r in range(KILLS + 1)]
    assert all(runs), "every run emitted events"
    for r, run in enumerate(runs):
        assert len({e["frame_id"] for e in run}) == len(run), f"run {r} emitted a frame twice (seed {seed})"
    # each restart resumed where the killed run had committed: it never re-processed a committed frame
    # (it may start later than what was read just after the kill, if a commit was still on its way)
    for r in range(1, KILLS + 1):
        committed = kills[r - 1]["committed"]
        for e in runs[r]:
            assert e["source"]["offset"] >= (committed.get(e["source"]["partition"]) or 0), (r, e["source"], seed)
    assert [sum(v or 0 for v in k["committed"].values()) for k in kills] == sorted(
        {sum(v or 0 for v in k["committed"].values()) for k in kills}), "every run committed progress"
    # duplicates: a frame emitted in run k and again later was in flight at kill k (emitted, not committed);
    # they stay within the in-flight bound, and they are all the extra events there are
    bound = in_flight_bound(QUEUE_FRAMES)
    later = [set().union(*({e["frame_id"] for e in run} for run in runs[k + 1:])) for k in range(KILLS)]
    in_flight_at_kill = [{e["frame_id"] for e in runs[k] if e["frame_id"] in later[k]} for k in range(KILLS)]
    duplicates = [len(frames) for frames in in_flight_at_kill]
    for k, frames in enumerate(in_flight_at_kill):
        committed = kills[k]["committed"]
        assert all(e["source"]["offset"] >= (committed.get(e["source"]["partition"]) or 0)
                   for e in runs[k] if e["frame_id"] in frames), f"a committed frame came again (seed {seed})"
        assert len(frames) <= bound, f"{len(frames)} frames re-delivered after kill {k} > bound {bound} (seed {seed})"
    assert sum(duplicates) == len(events) - FRAMES

    record_figures("crash_sigkill", {
        "seed": seed, "frames": FRAMES, "partitions": 3, "max_batch": MAX_BATCH, "queue_frames": QUEUE_FRAMES,
        "kill_thresholds_frames": thresholds, "distinct_frames_at_kill": [k["distinct_at_kill"] for k in kills],
        "events": len(events), "duplicates_per_kill": duplicates, "duplicate_bound_per_kill": bound,
        "restart_to_first_event_s": [k["restart_to_first_event_s"] for k in kills],
        "events_per_run": [len(r) for r in runs], "test_seconds": round(elapsed, 1),
    })


def fetched_after(tail: Tail, when: datetime):
    """A check: some event's frame was fetched after `when` (scans only the events not seen before)."""
    cursor = 0

    def check(records) -> bool:
        nonlocal cursor
        docs, cursor = tail.docs[cursor:], len(tail.docs)
        return any(datetime.fromisoformat(d["times"]["received_at"]) > when for d in docs)

    return check
