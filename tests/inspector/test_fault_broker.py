"""Broker faults, with `inspector run` as a subprocess and a broker of the test's own on a fixed port:
unreachable at start (one clear warning, quiet retries, then it connects and serves), then stopped in the
middle of a backlog and restarted (it reconnects, rejoins its group and serves the new frames without
crashing or a traceback storm; a clean SIGTERM still exits 0). If a send of the in-flight work fails on
the way back, the inspector exits with code 1 and one `inspector_failed` line, as designed; the test then
restarts it, as a supervisor would, and holds the restarted process to the same guarantees. max_batch 1 and a 3,000-frame backlog of
32×32 frames make the broker go away while frames are in flight.

The local broker keeps everything in memory, so after its restart the topics, the frames in them and the
group's committed offsets are gone: what is tested is what the inspector itself can guarantee. What holds
on a real, persistent Kafka cluster is in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer

from inspector.broker import LocalBroker, free_port
from inspector.topics import ensure_topics
from tests.helpers.harness import InspectorProcess, Tail, record_figures
from tests.helpers.streams import committed_positions, produce, service_settings, tiny_frame

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

OUTAGE_S = 3.0
MAX_LINES_DURING_OUTAGE = 40  # aiokafka lets each message template through once a minute (inspector/logs.py)


def frames(prefix: str, n: int):
    return [tiny_frame(f"{prefix}{i:05d}", camera=i % 4) for i in range(n)]


async def refill(bootstrap: str, topic: str, positions: dict[int, int | None]) -> None:
    """Write placeholder frames to each partition up to `positions` (the log a persistent broker would keep)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        filler = tiny_frame("filler")
        acks = [await producer.send(topic, filler.value, headers=filler.headers, partition=partition)
                for partition, position in positions.items() for _ in range(position or 0)]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


class Supervisor:
    """What a process supervisor does: when the inspector exits with code 1 (its design for a send that
    failed: one `inspector_failed` line, frames left uncommitted), start it again. Any other exit fails."""

    def __init__(self, first: InspectorProcess) -> None:
        self.processes = [first]
        self.exits: list[dict[str, object]] = []

    @property
    def current(self) -> InspectorProcess:
        return self.processes[-1]

    def alive(self) -> bool:
        current = self.current
        if current.alive():
            return True
        failed = current.events("inspector_failed")
        self.exits.append({"returncode": current.popen.returncode, "error": failed[0]["error"] if failed else None})
        if current.popen.returncode != 1 or len(failed) != 1:
            return False
        self.processes.append(InspectorProcess(current.settings, current.workdir,
                                               name=f"restart{len(self.processes)}").start())
        return True

    async def joined(self, timeout_s: float = 90.0) -> None:
        """Until the current process holds partitions (again, for the first one, whose first join was before
        the broker went away), restarting it as needed."""
        deadline = time.monotonic() + timeout_s
        while len(self.current.events("partitions_assigned")) < (2 if len(self.processes) == 1 else 1):
            assert self.alive(), f"the inspector exited: {self.exits[-1]}"
            assert time.monotonic() < deadline, "the inspector did not rejoin its group"
            await asyncio.sleep(0.05)


def test_broker_absent_at_start_then_restarted_mid_backlog(published_model_dir, tmp_path):
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    # slow on purpose (a 200×200-input model, one frame per batch), so the backlog is still being worked on
    # when the broker goes away
    settings = service_settings(bootstrap, "frames", published_model_dir, max_batch=1, connect_backoff_max_s=1.0)
    topics = {settings.topic: 2, settings.output_topic: 1, settings.dead_letter_topic: 1}
    before, backlog, after = frames("a", 100), frames("b", 10_000), frames("c", 100)
    process = InspectorProcess(settings, tmp_path)
    supervisor = Supervisor(process)
    figures: dict[str, object] = {}

    async def scenario(broker: LocalBroker) -> None:
        # 1. no broker: one warning, then quiet retries
        await process.wait_for_log("kafka_unreachable", timeout_s=60)
        await asyncio.sleep(2.5)
        assert len(process.events("kafka_unreachable")) == 1
        broker.start()
        up = time.monotonic()
        await ensure_topics(topics, client_kwargs={"bootstrap_servers": bootstrap})
        await produce(bootstrap, settings.topic, before)
        async with Tail(bootstrap, settings.output_topic) as tail:
            await tail.wait_until(lambda rs: set(tail.frames) >= {f.frame_id for f in before}, 60,
                                  "events for the frames sent once the broker was up", alive=process.alive)
            figures["start_broker_up_to_all_events_s"] = round(time.monotonic() - up, 2)
        figures["connect_attempts"] = process.events("kafka_connected")[0]["attempts"]

        # 2. the broker goes away in the middle of a backlog (as soon as it is written) and comes back empty
        await produce(bootstrap, settings.topic, backlog)
        done = await asyncio.to_thread(process.metric, "inspector_events_produced_total")
        lines_before = len(process.lines())
        broker.stop()
        assert done < len(before) + len(backlog), "the backlog was finished before the broker went away"
        figures["backlog_done_when_stopped"] = int(done) - len(before)
        await asyncio.sleep(OUTAGE_S)
        assert process.alive(), "the inspector exited while the broker was away"
        # A persistent broker comes back with its topics. This one comes back empty, and the inspector's
        # clients re-create topics by auto-creation the moment they reconnect; racing them with the admin
        # client left tansu answering produce and fetch requests for those topics with errors or nothing.
        # So the inspector is frozen (SIGSTOP) while the broker restarts and gets its topics back.
        process.freeze()
        broker.start()
        back = time.monotonic()
        await ensure_topics(topics, client_kwargs={"bootstrap_servers": bootstrap})
        process.thaw()
        await supervisor.joined()
        await asyncio.sleep(1.0)  # a send that fails on reconnection fails now: exit 1, restart, join again
        await supervisor.joined()
        figures["restart_to_rejoined_s"] = round(time.monotonic() - back, 2)
        # Frames whose events were acknowledged only after the restart had their (old) offsets committed to
        # the new broker; a persistent log would still hold everything below them. Refill the emptied log up
        # to there, or this broker (which answers a fetch past the end with nothing, not OFFSET_OUT_OF_RANGE)
        # would leave the group waiting for offsets that will not come back.
        committed = await committed_positions(bootstrap, settings.topic, settings.group_id)
        figures["committed_after_restart"] = committed
        await refill(bootstrap, settings.topic, committed)
        await produce(bootstrap, settings.topic, after)
        async with Tail(bootstrap, settings.output_topic) as tail:
            await tail.wait_until(lambda rs: any(f.startswith("c") for f in tail.frames), 60,
                                  "the first event after the restart", alive=supervisor.alive)
            figures["restart_to_first_new_event_s"] = round(time.monotonic() - back, 2)
            await tail.wait_until(lambda rs: set(tail.frames) >= {f.frame_id for f in after}, 60,
                                  "events for every frame sent after the restart", alive=supervisor.alive)
            figures["restart_to_all_new_events_s"] = round(time.monotonic() - back, 2)
            await tail.settle(0.5)
            figures["backlog_events_after_restart"] = sum(f.startswith("b") for f in tail.frames)
            assert all(count == 1 for frame_id, count in tail.frames.items() if frame_id.startswith("c"))
        figures["in_flight_when_the_group_was_lost"] = sum(
            line["in_flight"] for line in process.events("partitions_revoked"))
        outage = process.lines()[lines_before:]
        figures["log_lines_outage_to_recovery"] = len(outage)
        figures["warning_or_error_lines"] = sum(line.get("level") in ("warning", "error") for line in outage)
        assert len(outage) <= MAX_LINES_DURING_OUTAGE, "\n".join(map(str, outage))

    broker = LocalBroker(port)
    process.start()
    try:
        asyncio.run(scenario(broker))
        assert supervisor.current.terminate() == 0
    finally:
        for started in supervisor.processes:
            if started.alive():
                started.kill()
        broker.stop()

    for started in supervisor.processes:
        lines = started.lines()
        assert not [line for line in lines if "Traceback" in line.get("raw", "")], "a raw traceback reached the log"
        assert len(started.events("inspector_failed")) <= 1
    assert len(process.events("kafka_unreachable")) == 1 and len(process.events("kafka_connected")) == 1
    assert all(exit_["returncode"] == 1 and "SinkError" in exit_["error"] for exit_ in supervisor.exits)
    figures["outcome"] = "reconnected and served on" if not supervisor.exits else "exited 1 on a failed send, restarted"
    figures["exits"] = supervisor.exits
    figures["total_log_lines"] = sum(len(started.lines()) for started in supervisor.processes)
    record_figures("broker_faults", figures)
