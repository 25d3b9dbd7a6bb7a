"""Fixtures for the console's tests: defect events and dead letters as the inspector writes them, console
settings that join groups quickly on the local broker (tansu waits session_timeout/2), the console as a
subprocess, and a headless Chromium."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from inspector.console.settings import ConsoleSettings
from schemas.messages import DeadLetter, DefectEvent, event_id_for
from tests.helpers.console import BrowserUnavailable, ConsoleProcess, headless_chromium
from tests.helpers.http import http_get

CLASSES = ("crazing", "inclusion", "patches")
SHA = "0" * 64


def defect_event(frame_id: str, *, camera_id: str = "cam-1", label: str = "crazing", status: str = "defect",
                 latency_ms: float = 20.0, topic: str = "strip.frames", partition: int = 0, offset: int = 0,
                 version: str = "v1", **fields: Any) -> DefectEvent:
    now = datetime.now(UTC)
    probabilities = {name: (0.8 if name == label else 0.1) for name in CLASSES}
    times = {name: now - timedelta(milliseconds=latency_ms) if name == "captured_at" else now
             for name in ("captured_at", "produced_at", "received_at", "inferred_at", "emitted_at")}
    return DefectEvent(event_id=event_id_for(camera_id, frame_id, version), frame_id=frame_id, camera_id=camera_id,
                       source={"topic": topic, "partition": partition, "offset": offset}, label=label,
                       confidence=probabilities.get(label, 0.8), probabilities=probabilities, status=status,
                       model={"name": "tiny", "version": version, "sha256": SHA}, times=times,
                       latency_ms=latency_ms, **fields)


def dead_letter(reason: str, offset: int = 0, topic: str = "strip.frames") -> DeadLetter:
    now = datetime.now(UTC)
    return DeadLetter(reason=reason, detail="test", source={"topic": topic, "partition": 0, "offset": offset},
                      value_bytes=0, received_at=now, dead_lettered_at=now)


@pytest.fixture
def console_settings(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Callable[..., ConsoleSettings]:
    """Factory: ConsoleSettings from the given fields only (no INSPECTOR_CONSOLE_* from the environment,
    no .env), with a quick group join and an HTTP port picked by the OS."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("INSPECTOR_CONSOLE_")]:
        monkeypatch.delenv(name)

    def make(**fields: Any) -> ConsoleSettings:
        doc = dict(http_port=0, session_timeout_ms=3000, heartbeat_interval_ms=500, connect_backoff_max_s=0.5)
        return ConsoleSettings(**(doc | fields))

    return make


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_event() -> Callable[..., DefectEvent]:
    """Factory: `make_event("f1", camera_id="cam-2", coil_id="C1", strip_offset_m=3.5, ...)`."""
    return defect_event


@pytest.fixture
def make_dead_letter() -> Callable[..., DeadLetter]:
    return dead_letter


@pytest.fixture
def clock() -> Clock:
    return Clock()



@pytest.fixture
def fetch() -> Callable[..., Any]:
    """`status, headers, body = await fetch(url, method="GET")`, off the event loop."""

    async def get(url: str, method: str = "GET") -> tuple[int | None, dict[str, str], bytes]:
        return await asyncio.to_thread(http_get, url, method)

    return get


# -- the console as a subprocess, and a headless Chromium ----------------------------------------------

@pytest.fixture
def console_process(tmp_path: Path) -> Iterator[Callable[..., ConsoleProcess]]:
    """Factory: `console_process("--bootstrap-servers", b, "--topic", t, ...)` starts one; stopped (and
    checked to exit 0) after the test."""
    started: list[ConsoleProcess] = []

    def start(*flags: str) -> ConsoleProcess:
        started.append(ConsoleProcess(tmp_path / "console", flags))
        return started[-1]

    yield start
    for process in started:
        assert process.stop() == 0, process.log_path.read_text()[-3000:]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Debian's headless Chromium through Selenium (tests.helpers.console), or a clean skip saying what is missing."""
    try:
        driver = headless_chromium(tmp_path / "chromium-profile")
    except BrowserUnavailable as why:
        pytest.skip(str(why))
    try:
        yield driver
    finally:
        driver.quit()
