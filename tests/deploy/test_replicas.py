"""Two `inspector run` processes configured like the Kubernetes replicas, in one consumer group.

They start from the ConfigMap's INSPECTOR_* environment and the Deployment's command (only the broker,
topics, model directory, port and sizes are changed for the local broker and a 2-core machine), share
the partitions, emit exactly one event per frame between them, and their /metrics, /live and /ready
answer with the right content while they run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inspector.broker import free_port
from inspector.codec import loads
from tests.helpers.deploy import k8s_one
from tests.helpers.http import http_get
from tests.helpers.streams import Frame, create_topics, produce, raw_frames, read_records, unique_name

pytestmark = pytest.mark.kafka

PARTITIONS = 4
FRAMES = 48


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[tuple[str, dict[str, str], float]], metric: str, /, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == metric and labels.items() <= lab.items())


def consumed_partitions(samples: list[tuple[str, dict[str, str], float]], topic: str) -> set[int]:
    return {int(lab["partition"]) for n, lab, v in samples
            if n == "inspector_frames_consumed_total" and lab["topic"] == topic and v > 0}


class Replica:
    def __init__(self, argv: list[str], env: dict[str, str], port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def status(self, path: str) -> int | None:
        return http_get(self.url + path, timeout_s=2)[0]

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            out, err = self.process.communicate()
            pytest.fail(f"replica exited with {self.process.returncode}:\n{out}\n{err[-4000:]}")

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err


def replica_env(bootstrap: str, topic: str, group: str, model_dir: Path, port: int) -> dict[str, str]:
    config = k8s_one("ConfigMap")["data"]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    local = {
        "INSPECTOR_BOOTSTRAP_SERVERS": bootstrap, "INSPECTOR_TOPIC": topic,
        "INSPECTOR_OUTPUT_TOPIC": f"{topic}.events", "INSPECTOR_DEAD_LETTER_TOPIC": f"{topic}.dlq",
        "INSPECTOR_GROUP_ID": group, "INSPECTOR_MODEL_DIR": str(model_dir),
        "INSPECTOR_HTTP_HOST": "127.0.0.1", "INSPECTOR_HTTP_PORT": str(port),
        # Two replicas on a 2-core machine, small warm-up, and tansu's quick group join.
        "INSPECTOR_THREADS": "1", "INSPECTOR_MAX_BATCH": "4",
        "INSPECTOR_SESSION_TIMEOUT_MS": "3000", "INSPECTOR_HEARTBEAT_INTERVAL_MS": "500",
    }
    return inherited | dict(config) | local


def deployment_argv() -> list[str]:
    (container,) = k8s_one("Deployment")["spec"]["template"]["spec"]["containers"]
    argv = container["command"] + container.get("args", [])
    return [str(Path(sys.executable).parent / argv[0]), *argv[1:]]


def wait_for(check, timeout_s: float, what: str, replicas: list[Replica]) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        for r in replicas:
            r.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_two_replicas_share_the_partitions_and_emit_one_event_per_frame(kafka_broker, published_model_dir):
    topic, group = unique_name("frames"), unique_name("g")
    create_topics(kafka_broker, {topic: PARTITIONS, f"{topic}.events": 1, f"{topic}.dlq": 1})
    ports = [free_port(), free_port()]
    replicas = [Replica(deployment_argv(), replica_env(kafka_broker, topic, group, published_model_dir, p), p)
                for p in ports]
    try:
        wait_for(lambda: all(r.status("/live") == 200 for r in replicas), 90, "/live on both", replicas)
        # Both ready at once, then the first again: the second's join rebalanced the first.
        wait_for(lambda: all(r.status("/ready") == 200 for r in replicas) and replicas[0].status("/ready") == 200,
                 60, "/ready on both", replicas)

        frames = raw_frames(FRAMES, cameras=8)
        acks = asyncio.run(produce(kafka_broker, topic, frames))
        asyncio.run(produce(kafka_broker, topic, [Frame(b"cam-x", b"not a frame", [], "bad")]))
        records = asyncio.run(read_records(kafka_broker, f"{topic}.events", FRAMES, timeout_s=60))
        dead = asyncio.run(read_records(kafka_broker, f"{topic}.dlq", 1, timeout_s=30))

        pages = [http_get(r.url + "/metrics") for r in replicas]
        ready = [http_get(r.url + "/ready") for r in replicas]
        live = [http_get(r.url + "/live") for r in replicas]
        missing = [http_get(r.url + "/nothing-here")[0] for r in replicas]
        late = asyncio.run(read_records(kafka_broker, f"{topic}.events", FRAMES + 1, timeout_s=1.0))
    finally:
        stopped = [r.stop() for r in replicas]

    # Exactly one event per frame, between the two of them.
    seen = Counter(loads(r.value)["frame_id"] for r in late)
    assert len(records) == FRAMES and set(seen) == {f.frame_id for f in frames}
    assert all(n == 1 for n in seen.values()), f"repeated: {[k for k, n in seen.items() if n > 1]}"
    assert len(dead) == 1

    # Each replica owns its own partitions; together they cover every partition that received frames.
    samples = [metric_samples(body.decode()) for _, _, body in pages]
    owned = [consumed_partitions(s, topic) for s in samples]
    assert all(owned), f"a replica consumed nothing: {owned}"
    assert not owned[0] & owned[1]
    assert owned[0] | owned[1] >= {md.partition for md in acks}

    # The metrics add up to what went in and out, and describe the running model.
    assert all(status == 200 and headers["Content-Type"].startswith("text/plain") for status, headers, _ in pages)
    assert sum(value(s, "inspector_frames_consumed_total", topic=topic) for s in samples) == FRAMES + 1
    assert sum(value(s, "inspector_events_produced_total") for s in samples) == FRAMES
    assert sum(value(s, "inspector_dead_lettered_total") for s in samples) == 1
    assert sum(value(s, "inspector_batch_size_sum") for s in samples) == FRAMES
    assert sum(value(s, "inspector_event_latency_seconds_count") for s in samples) == FRAMES
    for s, mine in zip(samples, owned, strict=True):
        assert value(s, "inspector_model_info", name="test-eg-repvgg", version="v1") == 1
        assert value(s, "inspector_ready") == 1 and value(s, "inspector_consumer_group_joined") == 1
        assert value(s, "inspector_model_reloads_total", result="failure") == 0
        assert value(s, "inspector_inference_seconds_count") >= 1
        # the inference threads' CPU time in the model, within the wall time the batches took
        assert 0 < value(s, "inspector_inference_cpu_seconds_total") <= value(s, "inspector_inference_seconds_sum")
        assert value(s, "inspector_decode_cpu_seconds_total") > 0
        lag = {int(lab["partition"]): v for n, lab, v in s if n == "inspector_consumer_lag"}
        assert set(lag) <= mine and all(v >= 0 for v in lag.values())

    assert [status for status, _, _ in ready] == [200, 200]
    assert all(json.loads(body) == {"ready": True, "group_joined": True, "model": "test-eg-repvgg",
                                    "model_version": "v1"} for _, _, body in ready)
    assert [(status, json.loads(body)) for status, _, body in live] == [(200, {"live": True})] * 2
    assert missing == [404, 404]

    # SIGTERM (what Kubernetes sends) drains and exits cleanly.
    assert [code for code, _ in stopped] == [0, 0], [err[-2000:] for _, err in stopped]
