"""Service benchmark: `inspector run` end to end on the local broker, beside a naive consumer and the model alone.

One run, one machine (2 cores here), everything on loopback: a tansu broker (inspector.broker.LocalBroker),
the system under test as a subprocess, and this process as load generator and event reader. Frames are
200×200 gray JPEGs (NEU-CLS when present, else synthesized), spread over 3 partitions by camera id.

Per system, after a warm-up:
  * saturation — a closed loop keeps `outstanding` frames sent but not yet answered, so the system never
    waits for input and the backlog stays bounded; events/s over the window is its capacity, and its
    latency is mostly that backlog (Little's law), not the pipeline.
  * fixed rate — paced against the clock, at half the inspector's measured capacity (a load it should
    carry with room) and then at `rate` (the issue's 1,000 frames/s). After each phase the reader waits as
    long as its events keep coming (a backlog drains), up to `drain_limit_s`; frames still without an event
    once none came for `drain_timeout_s` count as missing, and as infinitely late in the percentiles.
For `inspector run` a profile phase in between samples it with py-spy (when installed) under saturation.

Systems: `inspector run` with its defaults (the settings an operator gets: backend, max_batch 32,
max_wait_ms 10, 1 thread, 2 inference workers on 2+ cores, queue_frames 256; only the group timeouts are
shortened to join faster), and
the naive consumer of benchmarks/naive_consumer.py (one frame at a time, eager torch at batch 1).
The model-only ceiling is the inspector's engine (same backend and threads) on pre-decoded frames at
the service's max_batch, measured in this process before the systems run and again after them; the
ratio uses their mean. CPU use per process during each phase is read from /proc, so the table shows
what the broker, the load generator and other jobs took from the same two cores.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from pydantic import BaseModel

from benchmarks import BenchOptions, Section, markdown_table
from benchmarks.loadgen import EventReader, Frames, Load, Offered, delivered_rate, latencies, load_frames
from benchmarks.pyspy import Profile, record, summarize
from inspector.app import build
from inspector.broker import LocalBroker, free_port
from inspector.settings import Settings
from inspector.topics import ensure_topics
from stripnet.architectures import EG_REPVGG
from stripnet.bundled import resolve_model_dir
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import build_model
from stripnet.preprocess import normalize

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
PARTITIONS = 3
INSPECTOR, NAIVE = "inspector run", "naive consumer"
System = str  # INSPECTOR, NAIVE or an inspector variant's name (VARIANTS)
DEFAULTS_AGAIN = "inspector run, the defaults again (last)"
# Issue 14, item 5: the inspector with one setting changed against its defaults (one intra-op thread, two
# inference workers on 2+ cores), in the same run.
VARIANTS: dict[str, dict[str, str]] = {
    "inspector run --threads 2": {"INSPECTOR_THREADS": "2"},
    "inspector run --inference-workers 1": {"INSPECTOR_INFERENCE_WORKERS": "1"},  # the default is 2 on 2+ cores
    "inspector run --no-keep-freed-memory": {"INSPECTOR_KEEP_FREED_MEMORY": "false"},  # glibc's own allocator
    # the defaults once more, after every variant: how far the same system drifts between the start and the end of
    # a run on this shared VM, against which a variant's difference from the defaults is read
    DEFAULTS_AGAIN: {},
}


@dataclass(frozen=True)
class Plan:
    rate: float  # frames/s offered in the fixed-rate phase
    fixed_s: float
    saturation_s: float
    outstanding: int  # frames in the closed loop
    warmup_s: float
    profile_s: float
    drain_timeout_s: float  # no event of the phase for this long after it: the rest are missing
    ceiling_s: float  # per ceiling case, per measurement
    ramp_s: float  # start of each window left out of the delivered rate
    drain_limit_s: float = 15.0  # the longest wait for a draining backlog after a phase

    @staticmethod
    def for_options(options: BenchOptions) -> Plan:
        if options.quick:
            return Plan(rate=200, fixed_s=3, saturation_s=3, outstanding=300, warmup_s=1, profile_s=2,
                        drain_timeout_s=10, ceiling_s=0.5, ramp_s=0.5, drain_limit_s=30)
        return Plan(rate=1000, fixed_s=12, saturation_s=15, outstanding=1000, warmup_s=3, profile_s=8,
                    drain_timeout_s=15, ceiling_s=3, ramp_s=2, drain_limit_s=120)


# --- results --------------------------------------------------------------------------------------------


class Cpu(BaseModel):
    """Cores used during a phase (1.0 = one core busy throughout), from /proc."""

    system_under_test: float | None
    broker: float | None
    load_generator: float | None  # this process: producer and event reader
    other: float | None  # the rest of the machine: other jobs
    idle: float | None


class Phase(BaseModel):
    system: str
    phase: str
    offered_fps: float | None  # None: closed loop
    sent: int
    sent_fps: float
    events: int
    missing: int  # no event by the end of the drain (Plan.drain_timeout_s, drain_limit_s)
    delivered_fps: float
    # None: that percentile falls among the frames that got no event (JSON has no infinity)
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    sut_cpu_ms_per_frame: float | None  # the system under test's CPU time per delivered frame
    mean_batch: float | None
    inference_busy: float | None  # share of the window the inspector's inference threads spent in predict
    # the inference threads' CPU time in predict and the decode threads' CPU time, per inferred frame (its
    # metrics); None in runs before them
    inference_cpu_ms_per_frame: float | None = None
    decode_cpu_ms_per_frame: float | None = None
    cpu: Cpu
    load_average_1min: float


class Ceiling(BaseModel):
    name: str
    backend: str
    batch: int
    frames_per_s: list[float]  # one per measurement (before and after the systems)
    frames_per_cpu_s: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.frames_per_s))

    @property
    def mean_per_cpu_s(self) -> float:
        return float(np.mean(self.frames_per_cpu_s))


class Target(BaseModel):
    target: str
    measured: str
    met: bool | None


class ServiceReport(BaseModel):
    frames: str
    model: str
    backend: str
    max_batch: int
    max_wait_ms: float
    threads: int | None
    inference_workers: int = 1  # absent from results recorded before it was a field: those ran one
    queue_frames: int
    partitions: int
    plan: dict[str, float]
    phases: list[Phase]
    ceilings: list[Ceiling]
    ratios: dict[str, float | None]
    targets: list[Target]
    profile: Profile | None
    profile_note: str
    load_average_1min: list[float]
    duplicates: dict[str, int]


def log(message: str) -> None:
    print(f"[bench service] {message}", file=sys.stderr, flush=True)


# --- CPU accounting -------------------------------------------------------------------------------------

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def machine_busy() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK, sum(values[:8]) / CLK


def child_pid(name: str) -> int | None:
    """A child of this process whose command name contains `name` (the tansu broker)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm, rest = (entry / "stat").read_text().rsplit(")", 1)
                if int(rest.split()[1]) == me and name in comm:
                    return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
    return None


@dataclass
class CpuMeter:
    sut: int | None
    broker: int | None

    def snapshot(self) -> tuple[float | None, ...]:
        machine = machine_busy()
        return (time.perf_counter(), cpu_seconds(self.sut) if self.sut else None,
                cpu_seconds(self.broker) if self.broker else None, cpu_seconds(os.getpid()),
                *(machine or (None, None)))

    @staticmethod
    def cores(start: tuple[float | None, ...], end: tuple[float | None, ...]) -> Cpu:
        wall = end[0] - start[0]  # type: ignore[operator]

        def d(i: int) -> float | None:
            return None if start[i] is None or end[i] is None else (end[i] - start[i]) / wall  # type: ignore[operator]

        sut, broker, me, busy, total = d(1), d(2), d(3), d(4), d(5)
        other = None if None in (busy, sut, broker, me) else max(0.0, busy - sut - broker - me)  # type: ignore[operator]
        idle = None if busy is None or total is None else max(0.0, total - busy)
        return Cpu(system_under_test=_r(sut), broker=_r(broker), load_generator=_r(me), other=_r(other), idle=_r(idle))


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# --- the systems under test -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    frames: str
    events: str
    dead_letters: str


def model_version_dir(tmp: Path) -> tuple[Path | None, Path, str]:
    """(--model-dir for the inspector or None for the bundled model, the version directory, a description)."""
    try:
        path = resolve_model_dir("default")
        _, manifest = load_checkpoint(path)
        return None, path, f"bundled trained model {manifest.model_name} {manifest.model_version}"
    except FileNotFoundError:
        torch.manual_seed(0)
        version = tmp / "models" / "20250101T000000.000000Z-bench"
        export_checkpoint(build_model(EG_REPVGG, len(CLASSES)), version, class_names=CLASSES,
                          model_name="kd-eg-repvgg-random", model_version="bench")
        return version.parent, version, "random initialisation (no bundled model; speed does not depend on weights)"


def inspector_command() -> list[str]:
    script = Path(sys.executable).parent / "inspector"
    return [str(script), "run"] if script.exists() else [sys.executable, "-m", "inspector.cli", "run"]


def inspector_env(bootstrap: str, topics: Topics, model_dir: Path | None, http_port: int,
                  threads: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    env |= {"INSPECTOR_BOOTSTRAP_SERVERS": bootstrap, "INSPECTOR_TOPIC": topics.frames,
            "INSPECTOR_OUTPUT_TOPIC": topics.events, "INSPECTOR_DEAD_LETTER_TOPIC": topics.dead_letters,
            "INSPECTOR_GROUP_ID": f"bench-{topics.frames}", "INSPECTOR_DEVICE": "cpu",
            "INSPECTOR_HTTP_HOST": "127.0.0.1", "INSPECTOR_HTTP_PORT": str(http_port),
            "INSPECTOR_LOG_LEVEL": "warning", "INSPECTOR_LOG_FORMAT": "json",
            "INSPECTOR_SESSION_TIMEOUT_MS": "6000", "INSPECTOR_HEARTBEAT_INTERVAL_MS": "1000"}
    if model_dir is not None:
        env["INSPECTOR_MODEL_DIR"] = str(model_dir)
    if threads is not None:
        env["INSPECTOR_THREADS"] = str(threads)
    return env | (extra or {})


@contextmanager
def subprocess_running(command: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except OSError:
        return 0, ""


async def wait_ready(port: int, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while (await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/ready"))[0] != 200:
        if process.poll() is not None:
            raise RuntimeError(f"inspector exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"inspector not ready within {timeout_s:g}s: {log_path.read_text()[-2000:]}")
        await asyncio.sleep(0.2)


def metric_sums(port: int | None) -> dict[str, float]:
    """The inspector's batch-size and inference-time histogram sums and counts (empty without a port)."""
    if port is None:
        return {}
    status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    wanted = ("inspector_batch_size_sum", "inspector_batch_size_count", "inspector_inference_seconds_sum",
              "inspector_inference_cpu_seconds_total", "inspector_decode_cpu_seconds_total")
    out = {}
    for line in text.splitlines() if status == 200 else []:
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name] = float(value)
    return out


def _per_frame_ms(seconds: float | None, frames: float) -> float | None:
    return round(seconds / frames * 1e3, 3) if seconds is not None and frames else None


# --- phases ---------------------------------------------------------------------------------------------


@dataclass
class Bench:
    plan: Plan
    load: Load
    reader: EventReader
    meter: CpuMeter
    system: System
    metrics_port: int | None = None

    async def warm_up(self) -> None:
        offered = await self.load.fixed_rate(f"{self.system[:5]}-warm", rate=100, seconds=self.plan.warmup_s)
        if not await self.reader.wait_for(offered, timeout_s=120):
            raise TimeoutError(f"{self.system}: no events for the warm-up frames within 120 s")

    async def phase(self, name: str, send: Callable[[str], object], offered_fps: float | None) -> Phase:
        prefix = f"{self.system[:5]}-{name.replace(' ', '-')}"
        metrics_before = await asyncio.to_thread(metric_sums, self.metrics_port)
        cpu_before = self.meter.snapshot()
        offered: Offered = await send(prefix)  # type: ignore[misc]
        cpu = self.meter.cores(cpu_before, self.meter.snapshot())
        metrics_after = await asyncio.to_thread(metric_sums, self.metrics_port)
        await self.reader.wait_for(offered, self.plan.drain_timeout_s, self.plan.drain_limit_s)
        return self._result(name, offered, offered_fps, cpu, metrics_before, metrics_after)

    def _result(self, name: str, offered: Offered, offered_fps: float | None, cpu: Cpu,
                before: dict[str, float], after: dict[str, float]) -> Phase:
        got = latencies(offered, self.reader)
        missing = len(offered.sent) - len(got)
        all_ms = np.concatenate([got * 1e3, np.full(missing, np.inf)]) if len(offered.sent) else np.zeros(1)

        def pct(q: float) -> float | None:
            value = float(np.percentile(all_ms, q, method="higher"))
            return round(value, 1) if np.isfinite(value) else None

        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        batches, inferred = d.get("inspector_batch_size_count", 0.0), d.get("inspector_batch_size_sum", 0.0)
        window = offered.ended - offered.started
        fps = delivered_rate(offered, self.reader, self.plan.ramp_s)
        return Phase(
            system=self.system, phase=name, offered_fps=offered_fps, sent=len(offered.sent),
            sent_fps=round(offered.rate, 1), events=len(got), missing=missing,
            delivered_fps=round(fps, 1),
            p50_ms=pct(50), p90_ms=pct(90), p99_ms=pct(99), max_ms=pct(100),
            sut_cpu_ms_per_frame=round(cpu.system_under_test / fps * 1e3, 3) if cpu.system_under_test and fps else None,
            mean_batch=round(inferred / batches, 1) if batches else None,
            inference_busy=round(d["inspector_inference_seconds_sum"] / window, 2) if batches else None,
            inference_cpu_ms_per_frame=_per_frame_ms(d.get("inspector_inference_cpu_seconds_total"), inferred),
            decode_cpu_ms_per_frame=_per_frame_ms(d.get("inspector_decode_cpu_seconds_total"), inferred),
            cpu=cpu, load_average_1min=round(os.getloadavg()[0], 2),
        )

    async def saturation(self, name: str = "saturation", seconds: float | None = None) -> Phase:
        s = seconds or self.plan.saturation_s
        return await self.phase(name, lambda p: self.load.closed_loop(p, s, self.plan.outstanding, self.reader), None)

    async def fixed_rate(self, rate: float, name: str) -> Phase:
        return await self.phase(name, lambda p: self.load.fixed_rate(p, rate, self.plan.fixed_s), rate)


TARGET, HALF = "fixed rate (target)", "fixed rate (half capacity)"


def half_capacity(saturation: Phase) -> float:
    """Half the inspector's measured capacity, rounded to 10 frames/s: a load it should carry with room."""
    return max(10.0, round(saturation.delivered_fps / 20) * 10)


async def bench_inspector(plan: Plan, bootstrap: str, topics: Topics, frames: Frames, model_dir: Path | None,
                          threads: int | None, tmp: Path, system: System = INSPECTOR,
                          ) -> tuple[list[Phase], Profile | None, str, int]:
    """The defaults get every phase and the profile; a variant (VARIANTS) saturation and the target rate."""
    port = free_port()
    log_path = tmp / f"{system.replace(' ', '_')}.log"
    env = inspector_env(bootstrap, topics, model_dir, port, threads, VARIANTS.get(system))
    with subprocess_running(inspector_command(), env, log_path) as process:
        async with EventReader(bootstrap, topics.events) as reader, \
                Load(bootstrap, topics.frames, PARTITIONS, frames) as load:
            t0 = time.monotonic()
            await wait_ready(port, process, log_path)
            log(f"{system} ready after {time.monotonic() - t0:.1f} s; warming up")
            bench = Bench(plan, load, reader, CpuMeter(process.pid, child_pid("tansu")), system, port)
            await bench.warm_up()
            phases = [await bench.saturation()]
            log(f"{system} saturation: {phases[-1].delivered_fps:.0f} events/s")
            profile, note = (await profile_inspector(bench, process.pid, tmp) if system == INSPECTOR
                             else (None, "defaults only"))
            rates = ((half_capacity(phases[0]), HALF), (plan.rate, TARGET)) if system == INSPECTOR else \
                ((plan.rate, TARGET),)
            for rate, name in rates:  # the target last: it may leave a backlog
                phases.append(await bench.fixed_rate(rate, name))
                log(f"{system} {name}, {rate:g}/s: {phases[-1].delivered_fps:.0f} events/s, "
                    f"p99 {_ms(phases[-1].p99_ms)}")
            return phases, profile, note, reader.duplicates


async def profile_inspector(bench: Bench, pid: int, tmp: Path) -> tuple[Profile | None, str]:
    raw = tmp / "inspector.pyspy.txt"
    spy = record(pid, bench.plan.profile_s, raw)
    if spy is None:
        return None, "py-spy is not installed (pip install py-spy): no profile"
    await asyncio.sleep(0.5)  # let it attach
    profiled = await bench.saturation("saturation under py-spy", bench.plan.profile_s)
    _, err = await asyncio.to_thread(spy.communicate)
    if spy.returncode != 0 or not raw.exists():
        return None, f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-300:]}"
    return summarize(raw, bench.plan.profile_s), (
        f"py-spy --nonblocking at 100 Hz for {bench.plan.profile_s:g} s under saturation "
        f"({profiled.delivered_fps:.0f} events/s while sampled)")


async def bench_naive(plan: Plan, bootstrap: str, topics: Topics, frames: Frames, version: Path,
                      threads: int | None, tmp: Path, half_rate: float) -> tuple[list[Phase], int]:
    command = [sys.executable, "-m", "benchmarks.naive_consumer", "--bootstrap-servers", bootstrap,
               "--topic", topics.frames, "--output-topic", topics.events, "--group-id", f"bench-{topics.frames}",
               "--model", str(version), "--threads", str(threads or 1)]
    log_path = tmp / "naive.log"
    with subprocess_running(command, dict(os.environ), log_path) as process:
        async with EventReader(bootstrap, topics.events) as reader, \
                Load(bootstrap, topics.frames, PARTITIONS, frames) as load:
            bench = Bench(plan, load, reader, CpuMeter(process.pid, child_pid("tansu")), NAIVE)
            try:
                await bench.warm_up()
            except TimeoutError as err:
                raise RuntimeError(f"{err}; naive consumer log: {log_path.read_text()[-2000:]}") from None
            phases = [await bench.saturation()]
            log(f"naive saturation: {phases[-1].delivered_fps:.0f} events/s")
            for rate, name in ((half_rate, HALF), (plan.rate, TARGET)):
                phases.append(await bench.fixed_rate(rate, name))
                log(f"naive {name}, {rate:g}/s: {phases[-1].delivered_fps:.0f} events/s, p99 {_ms(phases[-1].p99_ms)}")
            return phases, reader.duplicates


# --- the model-only ceiling -----------------------------------------------------------------------------


def decoded(frames: Frames, n: int = 64) -> list[np.ndarray]:
    return [cv2.imdecode(np.frombuffer(v, np.uint8), cv2.IMREAD_GRAYSCALE) for v in frames.values[:n]]


def rate_of(fn: Callable[[int], object], batch: int, seconds: float) -> tuple[float, float]:
    """(frames/s, frames per CPU-second) of calling fn(i) for `seconds` (at least 3 calls)."""
    fn(0)
    calls, t0, c0 = 0, time.perf_counter(), time.process_time()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        fn(calls)
        calls += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return round(batch * calls / wall, 1), round(batch * calls / max(cpu, 1e-9), 1)


@dataclass(frozen=True)
class CeilingCase:
    name: str
    backend: str
    batch: int
    fn: Callable[[int], object]


def ceiling_cases(version: Path, images: list[np.ndarray], frames: Frames, settings: Settings) -> list[CeilingCase]:
    model, manifest = load_checkpoint(version)
    runner = build(settings.model_copy(update={"device": "cpu"})).loader.load(model, manifest)  # as the service
    b, n = settings.max_batch, len(images)

    def service_batch(i: int) -> object:
        start = (i * b) % n
        return runner.predict((images * 2)[start:start + b])

    def naive_model(i: int) -> object:
        x = normalize(torch.from_numpy(images[i % n]).unsqueeze(0), manifest.input)
        with torch.inference_mode():
            return torch.softmax(model(x), dim=1)[0].tolist()

    def decode(i: int) -> object:
        return cv2.imdecode(np.frombuffer(frames.values[i % len(frames.values)], np.uint8), cv2.IMREAD_GRAYSCALE)

    return [CeilingCase("model-only ceiling: the inspector's engine on decoded frames", runner.name, b,
                        service_batch),
            CeilingCase("the naive consumer's model step (normalize + eager forward + softmax)", "torch", 1,
                        naive_model),
            CeilingCase("JPEG decode alone (cv2.imdecode, gray)", "OpenCV", 1, decode)]


def measure_ceilings(cases: list[CeilingCase], previous: list[Ceiling] | None, seconds: float) -> list[Ceiling]:
    out = []
    for i, case in enumerate(cases):
        fps, per_cpu = rate_of(case.fn, case.batch, seconds)
        before = previous[i] if previous else Ceiling(name=case.name, backend=case.backend, batch=case.batch,
                                                      frames_per_s=[], frames_per_cpu_s=[])
        out.append(before.model_copy(update={"frames_per_s": [*before.frames_per_s, fps],
                                             "frames_per_cpu_s": [*before.frames_per_cpu_s, per_cpu]}))
    return out


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- the run --------------------------------------------------------------------------------------------


async def run_all(plan: Plan, options: BenchOptions, tmp: Path) -> ServiceReport:
    settings = Settings(_env_file=None, **({"threads": options.threads} if options.threads else {}))  # type: ignore[call-arg]
    frames = load_frames()
    model_dir, version, model_note = model_version_dir(tmp)
    images = decoded(frames)
    loads = [round(os.getloadavg()[0], 2)]
    with torch_threads(settings.threads or torch.get_num_threads()):
        cases = ceiling_cases(version, images, frames, settings)
        log("model-only ceiling (before)")
        ceilings = measure_ceilings(cases, None, plan.ceiling_s)
    with LocalBroker(output=(tmp / "tansu.log").open("wb")) as broker:
        bootstrap = broker.bootstrap_servers
        systems = {name: Topics(f"frames-{key}", f"events-{key}", f"dlq-{key}")
                   for name, key in ((INSPECTOR, "inspector"), (NAIVE, "naive"),
                                     *((v, f"variant{i}") for i, v in enumerate(VARIANTS)))}
        await ensure_topics({t: PARTITIONS for s in systems.values() for t in (s.frames, s.events, s.dead_letters)},
                            client_kwargs={"bootstrap_servers": bootstrap})
        log(f"broker on {bootstrap}; {frames.source}; inspector run")
        phases, profile, profile_note, dup_inspector = await bench_inspector(
            plan, bootstrap, systems[INSPECTOR], frames, model_dir, options.threads, tmp)
        loads.append(round(os.getloadavg()[0], 2))
        log("naive consumer")
        naive_phases, dup_naive = await bench_naive(plan, bootstrap, systems[NAIVE], frames, version,
                                                    options.threads, tmp, half_capacity(phases[0]))
        phases += naive_phases
        loads.append(round(os.getloadavg()[0], 2))
        duplicates = {INSPECTOR: dup_inspector, NAIVE: dup_naive}
        for variant in VARIANTS:
            variant_phases, _, _, duplicates[variant] = await bench_inspector(
                plan, bootstrap, systems[variant], frames, model_dir, options.threads, tmp, variant)
            phases += variant_phases
        loads.append(round(os.getloadavg()[0], 2))
    with torch_threads(settings.threads or torch.get_num_threads()):
        log("model-only ceiling (after)")
        ceilings = measure_ceilings(cases, ceilings, plan.ceiling_s)
    loads.append(round(os.getloadavg()[0], 2))
    report = ServiceReport(
        frames=frames.source, model=model_note, backend=f"{settings.backend} → {cases[0].backend}",
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms, threads=settings.threads, inference_workers=settings.inference_workers,
        queue_frames=settings.queue_frames,
        partitions=PARTITIONS, plan={k: float(v) for k, v in plan.__dict__.items()}, phases=phases,
        ceilings=ceilings, ratios={}, targets=[], profile=profile, profile_note=profile_note,
        load_average_1min=loads, duplicates=duplicates,
    )
    report = report.model_copy(update={"ratios": ratios(report)})
    return report.model_copy(update={"targets": targets(report, plan)})


def _phase(report: ServiceReport, system: str, name: str) -> Phase | None:
    return next((p for p in report.phases if p.system == system and p.phase == name), None)


def ratios(report: ServiceReport) -> dict[str, float | None]:
    service, naive = _phase(report, INSPECTOR, "saturation"), _phase(report, NAIVE, "saturation")
    ceiling = report.ceilings[0].mean if report.ceilings else None

    def div(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    def per_cpu_s(phase: Phase | None) -> float | None:
        ms = phase.sut_cpu_ms_per_frame if phase is not None else None
        return 1e3 / ms if ms else None

    ceiling_cpu = report.ceilings[0].mean_per_cpu_s if report.ceilings else None
    return {"service / naive (saturation)": div(service and service.delivered_fps, naive and naive.delivered_fps),
            "service / model-only ceiling": div(service and service.delivered_fps, ceiling),
            "service / naive, frames per CPU-second (saturation)": div(per_cpu_s(service), per_cpu_s(naive)),
            "service / model-only ceiling, frames per CPU-second": div(per_cpu_s(service), ceiling_cpu),
            **{f"{v} / defaults (saturation)": div(_delivered(report, v), service and service.delivered_fps)
               for v in VARIANTS}}


def _delivered(report: ServiceReport, system: str) -> float | None:
    phase = _phase(report, system, "saturation")
    return phase.delivered_fps if phase is not None else None


def targets(report: ServiceReport, plan: Plan) -> list[Target]:
    """Issue 14's targets for `inspector run` with its defaults, against the naive consumer and the model alone."""
    out = []
    fixed, sat = _phase(report, INSPECTOR, TARGET), _phase(report, INSPECTOR, "saturation")
    if sat is not None:
        out.append(Target(target="saturation ≥ 2,000 frames/s delivered", measured=f"{sat.delivered_fps:,.0f}/s",
                          met=sat.delivered_fps >= 2000))
    naive = report.ratios.get("service / naive (saturation)")
    if naive is not None:
        naive_cpu = report.ratios.get("service / naive, frames per CPU-second (saturation)")
        out.append(Target(target="≥ 4× the naive consumer (saturation, same run)",
                          measured=f"{naive:.2f}× (frames per CPU-second: {_num(naive_cpu, '{:.2f}×')})",
                          met=naive >= 4))
    if fixed is not None:
        kept_up = fixed.delivered_fps >= 0.98 * plan.rate and fixed.sent_fps >= 0.98 * plan.rate
        out.append(Target(
            target=f"p99 ≤ 50 ms at {plan.rate:,.0f} frames/s offered",
            measured=f"offered {fixed.sent_fps:,.0f}/s, delivered {fixed.delivered_fps:,.0f}/s, p99 {_ms(fixed.p99_ms)}",
            met=kept_up and fixed.p99_ms is not None and fixed.p99_ms <= 50.0))
    ours = [p for p in report.phases if p.system != NAIVE]
    missing = sum(p.missing for p in ours)
    out.append(Target(target="0 frames without an event (every inspector phase)",
                      measured=f"{missing} of {sum(p.sent for p in ours):,}", met=missing == 0))
    per_cpu = report.ratios.get("service / model-only ceiling, frames per CPU-second")
    if per_cpu is not None and sat is not None and report.ceilings:
        model_ms = 1e3 / report.ceilings[0].mean_per_cpu_s
        inside = ("" if sat.inference_cpu_ms_per_frame is None or sat.decode_cpu_ms_per_frame is None else
                  f"; of it the model {sat.inference_cpu_ms_per_frame:.3f} ms, decoding "
                  f"{sat.decode_cpu_ms_per_frame:.3f} ms")
        out.append(Target(target="service CPU per delivered frame ≤ 1.3× model-only CPU per frame (same backend)",
                          measured=f"{1 / per_cpu:.2f}× ({_num(sat.sut_cpu_ms_per_frame, '{:.3f}')} vs "
                                   f"{model_ms:.3f} ms, saturation{inside})", met=1 / per_cpu <= 1.3))
    return out


# --- markdown -------------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "∞ (no event)" if v is None else f"{v:,.1f} ms"


def _num(v: float | None, fmt: str = "{:,.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def targets_table(targets: list[Target], source: str) -> str:
    return markdown_table([f"Target ({source})", "Measured", "Met"],
                          [[t.target, t.measured, {True: "yes", False: "**no**", None: "–"}[t.met]] for t in targets],
                          "lrl")


OTHER_JOBS_CORES = 0.05  # below this, no other job took a measurable share of a phase


def _other_jobs(report: ServiceReport) -> str:
    """What the CPU table says about the rest of the machine, for the report's first paragraph."""
    busiest = max((p.cpu.other for p in report.phases if p.cpu.other is not None), default=None)
    if busiest is None:
        return ""
    if busiest < OTHER_JOBS_CORES:
        return f", and no other job took more than {OTHER_JOBS_CORES:g} cores in any phase"
    return f", and so did other jobs (up to {busiest:.2f} cores in a phase)"


def render(report: ServiceReport, plan: Plan) -> str:
    phase_rows = [[p.system, p.phase, "closed loop" if p.offered_fps is None else f"{p.offered_fps:,.0f}/s",
                   f"{p.sent_fps:,.0f}", f"{p.delivered_fps:,.0f}", _ms(p.p50_ms), _ms(p.p90_ms), _ms(p.p99_ms),
                   _ms(p.max_ms), str(p.missing), _num(p.sut_cpu_ms_per_frame), _num(p.mean_batch, "{:.1f}"),
                   _num(p.inference_busy, "{:.0%}"), _num(p.inference_cpu_ms_per_frame, "{:.3f}"),
                   _num(p.decode_cpu_ms_per_frame, "{:.3f}")]
                  for p in report.phases]
    cpu_rows = [[p.system, p.phase, _num(p.cpu.system_under_test), _num(p.cpu.broker), _num(p.cpu.load_generator),
                 _num(p.cpu.other), _num(p.cpu.idle), f"{p.load_average_1min:.2f}"] for p in report.phases]
    ceiling_rows = [[c.name, c.backend, str(c.batch), " / ".join(f"{x:,.0f}" for x in c.frames_per_s),
                     " / ".join(f"{x:,.0f}" for x in c.frames_per_cpu_s)] for c in report.ceilings]
    parts = [
        f"Local tansu broker, {report.partitions} partitions, loopback only. Frames: {report.frames}, 200×200 gray "
        f"JPEG. Model: {report.model}. `inspector run` with its defaults: backend `{report.backend}`, max_batch "
        f"{report.max_batch}, max_wait_ms {report.max_wait_ms:g}, {report.threads} thread(s), "
        f"{report.inference_workers} inference worker(s), queue_frames "
        f"{report.queue_frames}. **The load generator (producer + event reader, one Python process), the broker and "
        f"the system under test share this machine's 2 cores{_other_jobs(report)}: see the CPU table and the load "
        f"averages ({', '.join(f'{x:.2f}' for x in report.load_average_1min)} along the run).** Latency = event "
        f"received by the reader − frame handed to the producer. Saturation: a closed loop "
        f"keeps {plan.outstanding:,} frames unanswered (latency there is mostly that backlog). Fixed rate: "
        f"{plan.fixed_s:g} s at half the inspector's saturation throughput, then at the target "
        f"{plan.rate:,.0f} frames/s; after a phase the reader waits while its events keep coming (up to "
        f"{plan.drain_limit_s:g} s), and frames without an event once none came for {plan.drain_timeout_s:g} s count "
        f"as missing and infinitely late. Delivered = events/s during the send window after its first "
        f"{plan.ramp_s:g} s. Variants (issue 14, item 5), each a fresh `inspector run` with one setting changed, get "
        f"the saturation and target phases: {', '.join(f'`{v}`' for v in VARIANTS)}; the last one changes nothing "
        f"and measures the run's drift.",
        markdown_table(["System", "Phase", "Offered", "Sent/s", "Delivered/s", "p50", "p90", "p99", "max", "Missing",
                        "CPU ms/frame", "Mean batch", "Inference busy", "Model CPU ms/frame",
                        "Decode CPU ms/frame"], phase_rows, "ll" + "r" * 13),
        markdown_table(["Model-only (this process, pre-decoded frames)", "Runtime", "Batch",
                        "frames/s (before / after)", "frames per CPU-s"], ceiling_rows, "llrrr"),
        "Ratios of frames/s depend on the share of the cores each system got while other jobs ran; the ratios of "
        "frames per CPU-second (the system's CPU time per delivered frame against the ceiling's) compare the work "
        "each does per frame.",
        markdown_table(["Ratio", "Value"], [[k, _num(v, "{:.2f}×")] for k, v in report.ratios.items()], "lr"),
        targets_table(report.targets, "issue 14"),
        "CPU cores used during each phase (2 = the whole machine): the system under test, the broker, this "
        "load generator, everything else, idle. CPU ms/frame (phase table) = the system under test's CPU time per "
        "delivered frame: steadier than frames/s when other jobs take a varying share of the cores. Inference busy "
        "= share of the window the inspector's inference threads spent in `predict`; Model and Decode CPU ms/frame "
        "= the CPU time its inference threads spent in `predict` and its decode threads in decoding, per inferred "
        "frame (all three from its metrics; with `--threads 2` torch's second intra-op thread is not in Model CPU, "
        "only in CPU ms/frame). Against the model-only ceiling's CPU per frame, the first says what the "
        "model itself costs inside the service; CPU ms/frame less both is the rest (Kafka client, events, event "
        "loop).",
        markdown_table(["System", "Phase", "SUT", "Broker", "Load gen", "Other jobs", "Idle", "Load avg"], cpu_rows,
                       "ll" + "r" * 6),
    ]
    if report.profile is not None:
        prof = report.profile
        parts += [f"Where `inspector run`'s time goes: {report.profile_note}; {prof.samples:,} non-idle samples. "
                  "Busy = samples / (rate × duration): threads running or waiting for a core in that stage "
                  "(on a shared machine, more than the CPU time it got).",
                  markdown_table(["Stage", "Busy", "Share"],
                                 [[s.name, f"{s.cores:.2f}", f"{s.share:.0%}"] for s in prof.categories], "lrr"),
                  markdown_table(["Thread", "Busy", "Share"],
                                 [[s.name, f"{s.cores:.2f}", f"{s.share:.0%}"] for s in prof.threads], "lrr"),
                  markdown_table(["Hottest innermost Python frames (self time)", "Busy", "Share"],
                                 [[f"`{s.name}`", f"{s.cores:.2f}", f"{s.share:.0%}"] for s in prof.hottest], "lrr")]
    else:
        parts.append(f"Profile: {report.profile_note}.")
    return "\n\n".join(parts)


# --- entry point ----------------------------------------------------------------------------------------


def run(options: BenchOptions) -> Section:
    plan = Plan.for_options(options)
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        report = asyncio.run(run_all(plan, options, Path(tmp)))
    return Section(name="service", title="Service: `inspector run` end to end on the local broker", result=report,
                   markdown=render(report, plan))
