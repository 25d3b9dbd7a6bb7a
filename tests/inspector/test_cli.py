"""Every `inspector` entry point, run as a subprocess the way a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspector.broker import LocalBroker, free_port, port_open
from inspector.codec import loads
from tests.helpers.http import http_get
from tests.helpers.streams import create_topics, produce, raw_frames, read_records, unique_name

pytestmark = pytest.mark.kafka

INSPECTOR = str(Path(sys.executable).parent / "inspector")
FAST_GROUP = {"INSPECTOR_SESSION_TIMEOUT_MS": "3000", "INSPECTOR_HEARTBEAT_INTERVAL_MS": "500"}


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([INSPECTOR, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"INSPECTOR_LOG_FORMAT": "json"} | (env or {}))


def stop(process: subprocess.Popen[str], timeout_s: float = 10.0) -> tuple[int, str, str, float]:
    """SIGTERM, then (returncode, stdout, stderr, seconds it took to exit)."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=timeout_s)
    return process.returncode, out, err, time.monotonic() - started


def wait_until(check, timeout_s: float, what: str, process: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"exited with {process.returncode} while waiting for {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def http_status(url: str) -> int | None:
    return http_get(url, timeout_s=1)[0]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_broker_then_replay_publish_a_folder_as_a_camera(tmp_path):
    images = tmp_path / "coil-7"
    (images / "top").mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(images / "top" / f"{i}.png"), np.full((32, 48), 40 * i, np.uint8))
    (images / "notes.txt").write_text("not a frame")
    port = free_port()
    broker = spawn("broker", "--port", str(port), "--partitions", "2")
    try:
        wait_until(lambda: port_open(port), 30, "the broker to listen", broker)
        time.sleep(0.5)  # topics are created right after it listens
        bootstrap = f"127.0.0.1:{port}"
        replay = subprocess.run([INSPECTOR, "replay", "--images", str(images), "--topic", "strip.frames",
                                 "--camera-id", "cam-7", "--bootstrap-servers", bootstrap, "--rate", "50"],
                                capture_output=True, text=True, timeout=60)
        assert replay.returncode == 0, replay.stderr
        assert "published 3 frames to strip.frames as camera cam-7" in replay.stdout
        assert "1 non-image files skipped" in replay.stdout
        records = asyncio.run(read_records(bootstrap, "strip.frames", 3, timeout_s=10))
    finally:
        code, _, err, seconds = stop(broker)
    assert code == 0 and seconds < 5, err
    assert any(line.get("event") == "broker_ready" for line in json_lines(err))
    assert sorted(dict(r.headers)["frame_id"] for r in records) == [b"top/0.png", b"top/1.png", b"top/2.png"]
    assert {r.key for r in records} == {b"cam-7"}


def test_run_waits_for_the_broker_serves_and_stops_cleanly_on_sigterm(published_model_dir):
    port, http_port = free_port(), free_port()
    bootstrap, topic = f"127.0.0.1:{port}", unique_name("frames")
    run = spawn("run", "--bootstrap-servers", bootstrap, "--topic", topic, "--output-topic", f"{topic}.events",
                "--dead-letter-topic", f"{topic}.dlq", "--group-id", unique_name("g"),
                "--model-dir", str(published_model_dir), "--device", "cpu", "--max-batch", "4",
                "--http-port", str(http_port), env=FAST_GROUP | {"INSPECTOR_CONNECT_BACKOFF_MAX_S": "0.5"})
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{http_port}/live") == 200, 90, "/live", run)
        time.sleep(1.5)  # retrying against a broker that is not there yet
        with LocalBroker(port):
            create_topics(bootstrap, {topic: 2, f"{topic}.events": 1, f"{topic}.dlq": 1})
            wait_until(lambda: http_status(f"http://127.0.0.1:{http_port}/ready") == 200, 30, "/ready", run)
            asyncio.run(produce(bootstrap, topic, raw_frames(6)))
            events = asyncio.run(read_records(bootstrap, f"{topic}.events", 6))
            metrics = http_get(f"http://127.0.0.1:{http_port}/metrics")[2].decode()
            code, _, err, seconds = stop(run)
    finally:
        if run.poll() is None:
            run.kill()
    assert code == 0 and seconds < 5, err
    assert sorted(loads(r.value)["frame_id"] for r in events) == [f"f{i:05d}" for i in range(6)]
    assert "inspector_events_produced_total 6.0" in metrics
    logs = json_lines(err)  # JSON lines: stderr is not a terminal
    names = [line["event"] for line in logs]
    assert names.count("kafka_unreachable") == 1, "one clear line while the broker is away"
    assert "kafka_connected" in names and "drained" in names
    (listening,) = [line for line in logs if line["event"] == "http_listening"]
    assert (listening["host"], listening["port"]) == ("0.0.0.0", http_port)  # the bound address, as it is
    assert "Traceback" not in err


def test_demo_runs_broker_replay_inspector_and_console_together():
    """With --stay the demo keeps serving after the replay; its console has counted every event."""
    demo = spawn("demo", "--limit", "12", "--max-batch", "4", "--rate", "100", "--stay", "--console-port", "0")
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while not lines or "replay over" not in lines[-1]:
            assert demo.poll() is None and time.monotonic() < deadline, "".join(lines) + demo.stderr.read()
            lines.append(demo.stdout.readline())
        (url,) = [line.split("demo: console on ", 1)[1].split()[0] for line in lines if "demo: console on" in line]
        state = lambda: json.loads(http_get(url + "api/state")[2] or b"{}")  # noqa: E731
        wait_until(lambda: state().get("events") == 12, 30, "the console to count the 12 events", demo)
    finally:
        code, out, err, _ = stop(demo, timeout_s=30)
    assert code == 0, "".join(lines) + out + err
    assert "demo: done — events 12/12" in out
    assert "ev/s" in "".join(lines) + out and "latency p50" in out and "unknown " in out


def test_usage_errors_are_one_line_and_exit_2(tmp_path):
    missing = subprocess.run([INSPECTOR, "replay", "--images", str(tmp_path / "nope"), "--bootstrap-servers",
                              "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("inspector replay: error:") and "nope" in missing.stderr


def test_help_lists_every_command_and_every_setting_with_its_default():
    top = subprocess.run([INSPECTOR, "--help"], capture_output=True, text=True, timeout=60)
    run = subprocess.run([INSPECTOR, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == run.returncode == 0
    assert all(name in top.stdout for name in ("run", "broker", "replay", "demo", "console"))
    assert "--max-batch int" in run.stdout and "(default: 32)" in run.stdout
    assert "--kafka.security-protocol" in run.stdout


def test_an_invalid_value_is_one_line_naming_the_flag_and_exits_2():
    bad = subprocess.run([INSPECTOR, "run", "--max-batch", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "inspector run: error: --max-batch: Input should be greater than 0"
