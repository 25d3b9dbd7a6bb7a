"""Connection hygiene (issue 13, items 3, 7 and 8): a bootstrap address that accepts TCP but never speaks Kafka is
reported within connect_timeout_s; SIGTERM ends `inspector run` within shutdown_timeout_s in every state —
connecting to it, loading a model whose read hangs, serving while a model poll hangs, draining against a
broker that stopped answering; a --model-dir that is a file and queue_frames < max_batch are start-up errors;
the logged HTTP address is the one that answers.

The bounds asserted are shutdown_timeout_s (2 s here) plus SLACK_S for the interpreter's exit and the HTTP
endpoint's own close (up to 1 s, inspector/endpoints.py); the defects took 40 s or for ever.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from inspector.broker import LocalBroker, free_port
from inspector.cli import main
from inspector.endpoints import serve_http
from inspector.metrics import Metrics
from inspector.topics import ensure_topics
from tests.helpers.harness import InspectorProcess, Tail, logged_at, record_figures
from tests.helpers.http import http_get
from tests.helpers.models import export_tiny, version_dir_name
from tests.helpers.streams import produce, service_settings, tiny_frame

SHUTDOWN_S = 2.0
CONNECT_S = 1.5
SLACK_S = 3.0


@pytest.fixture
def silent_bootstrap() -> Iterator[str]:
    """An address whose kernel completes the TCP handshake but nobody ever reads or answers (a wrong port)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)  # never accept(): connections queue in the backlog, established and silent
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    export_tiny(root / version_dir_name(1, "v1"), "v1")
    return root


def terminate_timed(inspector: InspectorProcess) -> tuple[int, float]:
    """SIGTERM and (exit code, seconds to exit); a process still there after 60 s is killed and fails the test."""
    started = time.monotonic()
    code = inspector.terminate(timeout_s=60)
    return code, time.monotonic() - started


def test_a_silent_bootstrap_is_reported_within_connect_timeout_and_sigterm_ends_the_wait(
        silent_bootstrap, models, tmp_path):
    settings = service_settings(silent_bootstrap, "frames", models, connect_timeout_s=CONNECT_S,
                                shutdown_timeout_s=SHUTDOWN_S, connect_backoff_max_s=0.5)
    inspector = InspectorProcess(settings, tmp_path).start()
    try:
        unreachable = asyncio.run(inspector.wait_for_log("kafka_unreachable", 60))
        starting = inspector.events("inspector_started") or inspector.events("model_active")
        warned_after_s = logged_at(unreachable) - logged_at(starting[-1])
        assert warned_after_s < CONNECT_S + SLACK_S
        assert "no Kafka answer within 1.5s" in unreachable["error"]
        (listening,) = inspector.events("http_listening")  # the logged address is the one that answers
        assert http_get(listening["url"] + "/live")[0] == 200 and listening["host"] == "127.0.0.1"
        time.sleep(CONNECT_S / 2)  # now in the middle of an attempt
        code, seconds = terminate_timed(inspector)
    finally:
        if inspector.alive():
            inspector.kill()
    assert code == 0 and seconds < SHUTDOWN_S + SLACK_S, (code, seconds)
    assert "stopped_before_connecting" in [e.get("event") for e in inspector.lines()]
    record_figures("hygiene_silent_bootstrap", {"connect_timeout_s": CONNECT_S, "shutdown_timeout_s": SHUTDOWN_S,
                                                "warned_after_s": round(warned_after_s, 3),
                                                "sigterm_exit_s": round(seconds, 3)})


HUNG_READ = textwrap.dedent("""
    import asyncio, sys, threading
    from inspector.app import build, run_until_signalled
    from inspector.logs import configure_logging
    from inspector.settings import Settings

    configure_logging("warning", "json")  # to stderr: stdout carries the markers
    settings = Settings.model_validate_json(sys.argv[1])
    real = build(settings).models

    class Hung:
        def load_initial(self):
            if sys.argv[2] == "load":
                print("reading", flush=True)
                threading.Event().wait()  # a read on a hung filesystem: never returns
            return real.load_initial()

        def poll(self):
            print("reading", flush=True)
            threading.Event().wait()

    service = build(settings, models=Hung()).service
    asyncio.run(run_until_signalled(service.run, asyncio.Event()))
    print("exited", flush=True)
""")


@pytest.mark.parametrize("where", ["load", "poll"])
def test_sigterm_ends_a_process_whose_model_read_hangs(where, kafka_broker, new_topic, models):
    """load: the initial model's read hangs (before connecting); poll: a hot-reload poll hangs while serving."""
    settings = service_settings(kafka_broker, new_topic(), models, shutdown_timeout_s=SHUTDOWN_S, model_poll_s=0.2)
    child = subprocess.Popen([sys.executable, "-c", HUNG_READ, settings.model_dump_json(), where],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "reading"
        time.sleep(0.3)
        started = time.monotonic()
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
        seconds = time.monotonic() - started
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0 and "exited" in out and seconds < SHUTDOWN_S + SLACK_S, (child.returncode, seconds)
    record_figures(f"hygiene_hung_{where}", {"sigterm_exit_s": round(seconds, 3), "shutdown_timeout_s": SHUTDOWN_S})


def tansu_process(port: int) -> psutil.Process:
    (found,) = [p for p in psutil.Process().children(recursive=True)
                if any(f"127.0.0.1:{port}" in part for part in p.cmdline())]
    return found


@pytest.mark.kafka
def test_sigterm_ends_a_drain_against_a_broker_that_stopped_answering(models, tmp_path):
    port = free_port()
    bootstrap, topic = f"127.0.0.1:{port}", "frames"
    with LocalBroker(port) as broker:
        asyncio.run(ensure_topics({topic: 1, f"{topic}.events": 1, f"{topic}.dlq": 1},
                                  client_kwargs={"bootstrap_servers": bootstrap}))
        settings = service_settings(bootstrap, topic, models, shutdown_timeout_s=SHUTDOWN_S, max_batch=1,
                                    queue_frames=64)
        inspector = InspectorProcess(settings, tmp_path).start()
        tansu = tansu_process(port)
        try:
            async def until_events() -> None:
                async with Tail(bootstrap, settings.output_topic) as tail:
                    await inspector.wait_for_log("partitions_assigned", 90)
                    await produce(bootstrap, topic, [tiny_frame(f"d{i:04d}") for i in range(300)])
                    await tail.wait_until(lambda rs: len(rs) >= 1, 60, "a first event", alive=inspector.alive)
            asyncio.run(until_events())
            tansu.suspend()  # the broker stops answering: acks, commits and the group's goodbye all wait
            code, seconds = terminate_timed(inspector)
        finally:
            tansu.resume()
            if inspector.alive():
                inspector.kill()
        broker.stop()
    assert code == 0 and seconds < SHUTDOWN_S + SLACK_S, (code, seconds)
    record_figures("hygiene_stuck_drain", {"sigterm_exit_s": round(seconds, 3), "shutdown_timeout_s": SHUTDOWN_S})
    names = [e.get("event") for e in inspector.lines()]
    assert "drained" in names and ("drain_timeout" in names or "commit_timeout" in names or "close_timeout" in names)


def test_a_model_dir_that_is_a_file_is_a_start_up_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").write_text("not a directory")
    assert main(["run", "--model-dir", str(tmp_path / "models"), "--bootstrap-servers", "127.0.0.1:1",
                 "--device", "cpu", "--log-level", "error"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"inspector run: error: model directory {tmp_path / 'models'} is not a directory"


def test_queue_frames_below_max_batch_is_a_settings_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--max-batch", "64", "--queue-frames", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("inspector run: error:") and "queue_frames (32) must be at least max_batch (64)" in err
    assert len(err.splitlines()) == 1


def test_settings_round_trip_for_the_child_processes(models):
    """The hung-read child rebuilds its settings from JSON: nested limits and paths survive."""
    from inspector.settings import Settings
    settings = service_settings("127.0.0.1:1", "t", models)
    assert Settings.model_validate_json(settings.model_dump_json()) == settings
    assert json.loads(settings.model_dump_json())["model_limits"]["max_blocks"] == 64


def test_the_reported_address_is_the_bound_one_on_all_interfaces_too():
    """Issue 13, item 8: the server listened on 0.0.0.0 while its log line said 127.0.0.1."""
    async def scenario() -> tuple[str, str, int]:
        async with serve_http(Metrics(), "0.0.0.0", 0) as endpoint:
            status, _, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{endpoint.port}/live")
            return endpoint.host, endpoint.url, status

    host, url, status = asyncio.run(scenario())
    assert host == "0.0.0.0" and url.startswith("http://0.0.0.0:") and status == 200
