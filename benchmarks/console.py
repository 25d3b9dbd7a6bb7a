"""Console benchmark: what `inspector console` costs its process at 1,000 events/s with one page connected.

One run on loopback: a tansu broker (inspector.broker.LocalBroker); a frames topic holding the pictures
(the JPEG frames of benchmarks/loadgen.py, NEU-CLS when present); `inspector console` as a subprocess with
its defaults (tests.helpers.console.ConsoleProcess; only the group timeouts are shortened to join faster);
and this process, which offers defect events to the events topic, paced against the clock, and plays the
page. Events are built here, as `inspector run --locate` writes them (inspector.codec), so the console is
the only system under test: no model runs.

The page is what console.js does, without a browser: one server-sent-events stream (`/stream`), each card's
picture fetched once (a browser's cache keeps them: the console sends them `immutable`), and the coil view
fetched with each figures update, over at most 6 connections (a browser's limit per host).

Phases: idle (the page connected, no events), then `rate` events/s for `seconds`. Per phase: the console's
CPU (cores, from /proc: benchmarks.service.CpuMeter, which also shows the broker, this load generator and
the rest of the machine), its resident memory (VmRSS at the end, VmHWM = peak), the events it counted
against those offered (after a drain), the cards it sent to the page (against `max_cards_per_s`), and the
picture fetches with their latency.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from benchmarks import BenchOptions, Section, markdown_table, percentile_ms
from benchmarks.loadgen import CAMERAS, Load, load_frames, paced
from benchmarks.service import CLASSES, Cpu, CpuMeter, Target, child_pid, targets_table
from inspector.broker import LocalBroker
from inspector.codec import dumps
from inspector.console.settings import ConsoleSettings
from inspector.topics import ensure_topics
from schemas.messages import DefectEvent, event_id_for
from tests.helpers.console import ConsoleProcess

EVENT_PARTITIONS = 3
PAGE_CONNECTIONS = 6  # a browser's connections per host: the stream holds one
COIL_EVENTS = 3000  # events per coil: a coil is a few minutes of strip
COIL_STEP_M = 0.25
FRAME_RATE = 2000.0  # frames/s while the pictures are put on the frames topic, before the phases


@dataclass(frozen=True)
class Plan:
    rate: float  # events/s offered
    seconds: float
    idle_s: float
    drain_timeout_s: float

    @staticmethod
    def for_options(options: BenchOptions) -> Plan:
        if options.quick:
            return Plan(rate=200, seconds=3, idle_s=1, drain_timeout_s=10)
        return Plan(rate=1000, seconds=20, idle_s=5, drain_timeout_s=20)


# --- results --------------------------------------------------------------------------------------------


class Memory(BaseModel):
    rss_mib: float | None  # at the end of the phase
    peak_mib: float | None  # VmHWM: the process's peak so far


class Pictures(BaseModel):
    fetched: int
    ok: int
    failed: dict[str, int]  # HTTP status -> count
    kib_per_picture: float | None
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


class Phase(BaseModel):
    phase: str
    offered_eps: float | None
    sent: int
    sent_eps: float
    counted: int  # events the console counted (its /api/state) once drained
    drain_s: float | None  # after the send window, until the console had counted every event; None: never
    cards: int  # cards the page received during the window
    cards_per_s: float
    max_cards_in_1s: int  # the most cards in any one-second window (receipt times at the page)
    stream_kib_per_s: float
    coil_fetches: int
    pictures: Pictures
    console_cpu_ms_per_event: float | None
    cpu: Cpu
    memory: Memory


class ConsoleReport(BaseModel):
    frames: str
    frames_on_topic: int
    max_cards_per_s: float
    recent_events: int
    picture_cache_mb: float
    plan: dict[str, float]
    phases: list[Phase]
    targets: list[Target]
    console_exit_code: int | None


def log(message: str) -> None:
    print(f"[bench console] {message}", file=sys.stderr, flush=True)


def memory(pid: int) -> Memory:
    """VmRSS and VmHWM of `pid` from /proc (None where it cannot be read)."""
    fields: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = round(int(value.split()[0]) / 1024, 1)  # kB
    except (OSError, ValueError, IndexError):
        pass
    return Memory(rss_mib=fields.get("VmRSS"), peak_mib=fields.get("VmHWM"))


# --- the events -----------------------------------------------------------------------------------------


def defect_events(count: int, frames_topic: str, frames_on_topic: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(key, value) of `count` events as the inspector writes them with --locate: 6 cameras, the NEU classes,
    one or two boxes, coils of COIL_EVENTS events along the strip; event i's frame is at offset i % frames."""
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    model = {"name": "kd-eg-repvgg", "version": "bench", "sha256": "0" * 64}
    out = []
    for i in range(count):
        camera, frame_id = f"cam-{i % CAMERAS}", f"bench/{i:07d}"
        probabilities = rng.dirichlet(np.full(len(CLASSES), 0.3))
        best = int(np.argmax(probabilities))
        latency_ms = float(rng.gamma(4.0, 4.0))
        x0, y0 = (int(v) for v in rng.integers(0, 150, 2))
        boxes = [{"x0": x0, "y0": y0, "x1": x0 + 40, "y1": y0 + 30, "score": 1.0}]
        if i % 2:
            boxes.append({"x0": 10, "y0": 10, "x1": 50, "y1": 60, "score": 0.6})
        event = DefectEvent(
            event_id=event_id_for(camera, frame_id, model["version"]), frame_id=frame_id, camera_id=camera,
            coil_id=f"C-{1000 + i // COIL_EVENTS}", strip_offset_m=(i % COIL_EVENTS) * COIL_STEP_M,
            source={"topic": frames_topic, "partition": 0, "offset": i % frames_on_topic},
            label=CLASSES[best], confidence=float(probabilities[best]),
            probabilities=dict(zip(CLASSES, map(float, probabilities), strict=True)),
            status="defect" if probabilities[best] >= 0.5 else "uncertain", model=model,
            times={name: now - timedelta(milliseconds=latency_ms) if name == "captured_at" else now
                   for name in ("captured_at", "produced_at", "received_at", "inferred_at", "emitted_at")},
            latency_ms=latency_ms, boxes=boxes)
        out.append((camera.encode(), dumps(event)))
    return out


async def offer(producer: AIOKafkaProducer, topic: str, events: list[tuple[bytes, bytes]],
                rate: float) -> tuple[float, float]:
    """Send `events` at `rate` per second; the send window, once the broker has acknowledged them all."""
    acks: list[asyncio.Future] = []
    pending = iter(events)

    async def send() -> None:
        key, value = next(pending)
        acks.append(await producer.send(topic, value, key=key))

    window = await paced(send, rate, len(events))
    await asyncio.gather(*acks)
    return window


# --- the page -------------------------------------------------------------------------------------------


@dataclass
class Fetch:
    """One picture the page asked for."""

    requested_at: float
    seconds: float = 0.0
    status: int | None = None
    bytes: int = 0


@dataclass
class Page:
    """One page on the console: its stream, its pictures and its coil view, as console.js asks for them."""

    url: str
    cards: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter at receipt, cards)
    stream_bytes: list[tuple[float, int]] = field(default_factory=list)
    pictures: dict[str, Fetch] = field(default_factory=dict)  # by URL path
    coil_fetches: list[float] = field(default_factory=list)
    stats: dict | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def run(self, session: aiohttp.ClientSession) -> None:
        async with session.get(self.url + "stream") as response:
            response.raise_for_status()
            kind = ""
            async for line in response.content:
                self.stream_bytes.append((time.perf_counter(), len(line)))
                if line.startswith(b"event: "):
                    kind = line[7:].strip().decode()
                elif line.startswith(b"data: "):
                    self._on(session, kind, orjson.loads(line[6:]))

    def _on(self, session: aiohttp.ClientSession, kind: str, data: object) -> None:
        if kind == "cards":
            assert isinstance(data, list)
            self.cards.append((time.perf_counter(), len(data)))
            for card in data:
                if card["picture"] not in self.pictures:
                    self.pictures[card["picture"]] = fetch = Fetch(time.perf_counter())
                    self._spawn(self._picture(session, card["picture"], fetch))
        elif kind == "stats":
            assert isinstance(data, dict)
            self.stats = data
            if data["coils"]:
                self._spawn(self._coil(session, data["coils"][0]["coil_id"]))

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _picture(self, session: aiohttp.ClientSession, path: str, fetch: Fetch) -> None:
        try:
            async with session.get(self.url + path.lstrip("/")) as response:
                fetch.bytes = len(await response.read())
                fetch.status = response.status
        except aiohttp.ClientError:
            pass  # status stays None
        fetch.seconds = time.perf_counter() - fetch.requested_at

    async def _coil(self, session: aiohttp.ClientSession, coil_id: str) -> None:
        async with session.get(self.url + "api/coil", params={"id": coil_id}) as response:
            await response.read()
            self.coil_fetches.append(time.perf_counter())

    async def settle(self) -> None:
        """Wait for the picture and coil requests in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


@dataclass(frozen=True)
class Window:
    start: float
    end: float

    def holds(self, t: float) -> bool:
        return self.start <= t <= self.end


def max_in_one_second(receipts: list[tuple[float, int]]) -> int:
    """The most cards whose receipt times fall in any one-second interval [t, t + 1)."""
    times = np.array([t for t, _ in receipts])
    counts = np.cumsum([0] + [n for _, n in receipts])
    if not len(times):
        return 0
    ends = np.searchsorted(times, times + 1.0, side="left")
    return int(max(counts[e] - counts[i] for i, e in enumerate(ends)))


def picture_figures(fetches: list[Fetch]) -> Pictures:
    ok = [f for f in fetches if f.status == 200]
    failed = Counter(str(f.status) for f in fetches if f.status != 200)
    seconds = [f.seconds for f in ok]

    def ms(q: float) -> float | None:
        return round(percentile_ms(seconds, q), 1) if seconds else None

    return Pictures(fetched=len(fetches), ok=len(ok), failed=dict(failed),
                    kib_per_picture=round(float(np.mean([f.bytes for f in ok])) / 1024, 1) if ok else None,
                    p50_ms=ms(50), p99_ms=ms(99), max_ms=ms(100))


# --- phases ---------------------------------------------------------------------------------------------


@dataclass
class Bench:
    plan: Plan
    console: ConsoleProcess
    page: Page
    meter: CpuMeter
    producer: AIOKafkaProducer
    events_topic: str

    async def phase(self, name: str, events: list[tuple[bytes, bytes]], rate: float | None,
                    seconds: float) -> Phase:
        counted_before = (await self._state())["events"]
        cpu_before = self.meter.snapshot()
        if events and rate:
            start, end = await offer(self.producer, self.events_topic, events, rate)
        else:
            start = time.perf_counter()
            await asyncio.sleep(seconds)
            end = time.perf_counter()
        cpu = self.meter.cores(cpu_before, self.meter.snapshot())
        mem = memory(self.console.pid)
        counted, drain_s = await self._drain(counted_before + len(events), end)
        await self.page.settle()
        window = Window(start, end)
        cards = [(t, n) for t, n in self.page.cards if window.holds(t)]
        wall = end - start
        streamed = sum(n for t, n in self.page.stream_bytes if window.holds(t))
        return Phase(
            phase=name, offered_eps=rate, sent=len(events), sent_eps=round(len(events) / wall, 1),
            counted=counted - counted_before, drain_s=drain_s, cards=sum(n for _, n in cards),
            cards_per_s=round(sum(n for _, n in cards) / wall, 2), max_cards_in_1s=max_in_one_second(cards),
            stream_kib_per_s=round(streamed / wall / 1024, 2),
            coil_fetches=sum(window.holds(t) for t in self.page.coil_fetches),
            pictures=picture_figures([f for f in self.page.pictures.values() if window.holds(f.requested_at)]),
            console_cpu_ms_per_event=(round(cpu.system_under_test / (len(events) / wall) * 1e3, 4)
                                      if cpu.system_under_test and events else None),
            cpu=cpu, memory=mem)

    async def _state(self) -> dict:
        state = await asyncio.to_thread(self.console.state)
        assert state is not None, "the console does not answer /api/state"
        return state

    async def _drain(self, expected: int, window_end: float) -> tuple[int, float | None]:
        """(events counted, seconds after the window until all `expected` were) within drain_timeout_s."""
        deadline = time.perf_counter() + self.plan.drain_timeout_s
        while (counted := (await self._state())["events"]) < expected and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        return counted, round(time.perf_counter() - window_end, 2) if counted >= expected else None


async def run_all(plan: Plan, tmp: Path) -> ConsoleReport:
    defaults = ConsoleSettings(_env_file=None)  # type: ignore[call-arg]
    frames = load_frames()
    with LocalBroker(output=(tmp / "tansu.log").open("wb")) as broker:
        bootstrap = broker.bootstrap_servers
        topics = {"frames-console": 1, "events-console": EVENT_PARTITIONS, "dlq-console": 1}
        await ensure_topics(topics, client_kwargs={"bootstrap_servers": bootstrap})
        async with Load(bootstrap, "frames-console", 1, frames) as load:
            on_topic = len((await load.fixed_rate("frame", FRAME_RATE, len(frames.values) / FRAME_RATE)).sent)
        log(f"broker on {bootstrap}; {on_topic} frames on the frames topic ({frames.source})")
        events = defect_events(int(plan.rate * plan.seconds), "frames-console", on_topic)
        console = ConsoleProcess(tmp / "console", ["--bootstrap-servers", bootstrap, "--topic", "events-console",
                                                   "--dead-letter-topic", "dlq-console", "--log-level", "warning",
                                                   "--session-timeout-ms", "3000", "--heartbeat-interval-ms", "500"])
        exit_code: int | None = None
        try:
            await asyncio.to_thread(console.wait_joined)
            log(f"console joined its group ({console.url}); the page connects")
            connector = aiohttp.TCPConnector(limit_per_host=PAGE_CONNECTIONS)
            async with aiohttp.ClientSession(connector=connector) as session, \
                    AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5) as producer:
                page = Page(console.url)
                stream = asyncio.create_task(page.run(session))
                while page.stats is None:
                    assert not stream.done(), stream.exception()
                    await asyncio.sleep(0.05)
                bench = Bench(plan, console, page, CpuMeter(console.pid, child_pid("tansu")), producer,
                              "events-console")
                phases = [await bench.phase("idle, page connected", [], None, plan.idle_s)]
                log(f"idle: console {phases[0].cpu.system_under_test} cores")
                phases.append(await bench.phase(f"{plan.rate:,.0f} events/s, page connected", events, plan.rate,
                                                plan.seconds))
                log(f"{plan.rate:g} events/s: console {phases[1].cpu.system_under_test} cores, "
                    f"{phases[1].cards} cards, {phases[1].pictures.fetched} pictures")
                stream.cancel()
                await asyncio.gather(stream, return_exceptions=True)
        finally:
            exit_code = await asyncio.to_thread(console.stop)
    report = ConsoleReport(frames=frames.source, frames_on_topic=on_topic, max_cards_per_s=defaults.max_cards_per_s,
                           recent_events=defaults.recent_events, picture_cache_mb=defaults.picture_cache_mb,
                           plan={k: float(v) for k, v in plan.__dict__.items()}, phases=phases, targets=[],
                           console_exit_code=exit_code)
    return report.model_copy(update={"targets": targets(report)})


def targets(report: ConsoleReport) -> list[Target]:
    """Issue 17, item 3, at the rate offered: every event counted, the page's cards within their rate."""
    loaded = report.phases[-1]
    limit = report.max_cards_per_s
    return [
        Target(target="every event offered is counted",
               measured=f"{loaded.counted:,} of {loaded.sent:,}"
                        + (f", the last {loaded.drain_s:.2f} s after the send window" if loaded.drain_s is not None
                           else f", not within {report.plan['drain_timeout_s']:g} s"),
               met=loaded.counted == loaded.sent),
        Target(target=f"at most max_cards_per_s = {limit:g} cards/s to the page",
               measured=f"{loaded.cards_per_s:.2f}/s over the window, at most {loaded.max_cards_in_1s} in any 1 s",
               met=loaded.max_cards_in_1s <= limit),
        Target(target="every card's picture served",
               measured=f"{loaded.pictures.ok} of {loaded.pictures.fetched}"
                        + (f" (failed: {loaded.pictures.failed})" if loaded.pictures.failed else ""),
               met=loaded.pictures.ok == loaded.pictures.fetched),
        Target(target="the console exits 0 on SIGTERM", measured=str(report.console_exit_code),
               met=report.console_exit_code == 0),
    ]


# --- markdown -------------------------------------------------------------------------------------------


def _num(v: float | None, fmt: str = "{:,.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def render(report: ConsoleReport, plan: Plan) -> str:
    rows = [[p.phase, f"{p.sent_eps:,.0f}", f"{p.counted:,}", _num(p.cpu.system_under_test),
             _num(p.console_cpu_ms_per_event, "{:.3f}"), _num(p.memory.rss_mib, "{:.0f}"),
             _num(p.memory.peak_mib, "{:.0f}"), str(p.cards), f"{p.cards_per_s:.1f}", str(p.max_cards_in_1s),
             f"{p.pictures.ok}/{p.pictures.fetched}", _num(p.pictures.p50_ms, "{:.1f}"),
             _num(p.pictures.p99_ms, "{:.1f}"), f"{p.stream_kib_per_s:.1f}", str(p.coil_fetches)]
            for p in report.phases]
    cpu_rows = [[p.phase, _num(p.cpu.system_under_test), _num(p.cpu.broker), _num(p.cpu.load_generator),
                 _num(p.cpu.other), _num(p.cpu.idle)] for p in report.phases]
    return "\n\n".join([
        f"`inspector console` with its defaults (max_cards_per_s {report.max_cards_per_s:g}, recent_events "
        f"{report.recent_events}, picture cache {report.picture_cache_mb:g} MiB) as a subprocess on the local tansu "
        f"broker, loopback only. Events: built by the benchmark as `inspector run --locate` writes them (6 cameras, "
        f"6 classes, 1–2 boxes, coils of {COIL_EVENTS:,} events), {EVENT_PARTITIONS} partitions, offered at "
        f"{plan.rate:,.0f}/s for {plan.seconds:g} s after {plan.idle_s:g} s idle. Pictures: {report.frames_on_topic:,} "
        f"frames on one partition ({report.frames}); event i shows frame i mod {report.frames_on_topic:,}. The page: "
        f"an SSE client of `/stream` in the benchmark's process that does what console.js does (each card's picture "
        f"once, the coil view with each figures update, ≤ {PAGE_CONNECTIONS} connections), not a browser. **The "
        f"console, the broker and the load generator share this machine's 2 cores with other jobs: see the CPU "
        f"table.**",
        markdown_table(["Phase", "Sent/s", "Counted", "Console CPU (cores)", "CPU ms/event", "RSS MiB", "Peak MiB",
                        "Cards", "Cards/s", "Max cards in 1 s", "Pictures ok", "Picture p50 ms", "Picture p99 ms",
                        "Stream KiB/s", "Coil fetches"], rows, "l" + "r" * 14),
        targets_table(report.targets, "issue 17"),
        "Counted: events in the console's figures (`/api/state`, which it recomputes every stats_interval_s = "
        "1 s) once drained; the drain time after the send window includes up to that second. Cards, pictures, "
        "coil fetches and stream bytes: what the page received or asked for during the send window. Max cards "
        "in 1 s: over receipt times at the page, which add the scheduling delays of both processes.",
        "CPU cores used during each phase (2 = the whole machine): the console, the broker, this load generator "
        "(producer and page), everything else, idle. Console CPU ms/event = its CPU time per event offered.",
        markdown_table(["Phase", "Console", "Broker", "Load gen", "Other jobs", "Idle"], cpu_rows, "l" + "r" * 5),
    ])


# --- entry point ----------------------------------------------------------------------------------------


def run(options: BenchOptions) -> Section:
    plan = Plan.for_options(options)
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        report = asyncio.run(run_all(plan, Path(tmp)))
    return Section(name="console", title="Console: what `inspector console` costs at 1,000 events/s",
                   result=report, markdown=render(report, plan))
