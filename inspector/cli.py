"""`inspector` command line: run, broker, replay, demo.

Settings come from CLI flags > environment (INSPECTOR_…) > .env > defaults. Heavy modules (torch,
OpenCV) are imported only by the commands that need them, so `broker` and `replay` start quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _settings(args: argparse.Namespace, **extra):
    from inspector.settings import load_settings

    flags = {name: getattr(args, name, None) for name in (
        "bootstrap_servers", "topic", "output_topic", "dead_letter_topic", "group_id", "model_dir", "device",
        "max_batch", "max_wait_ms", "http_port", "locate", "log_level", "threads", "backend")}
    return load_settings(**(flags | extra))


def _logging(settings) -> None:
    from inspector.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)


# -- run ------------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(settings)
    from inspector.service import run_inspector

    return asyncio.run(run_inspector(settings))


# -- broker ---------------------------------------------------------------------------------------

def cmd_broker(args: argparse.Namespace) -> int:
    import signal
    import subprocess

    import structlog

    from inspector.broker import LocalBroker
    from inspector.settings import kafka_client_kwargs
    from inspector.topics import ensure_topics

    settings = _settings(args, bootstrap_servers=f"127.0.0.1:{args.port}")
    _logging(settings)
    log = structlog.get_logger("inspector.broker")
    stop = asyncio.Event()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with LocalBroker(args.port, output=None if args.verbose else subprocess.DEVNULL) as broker:
            topics = {settings.topic: args.partitions, settings.output_topic: args.partitions,
                      settings.dead_letter_topic: args.partitions}
            created = await ensure_topics(topics, client_kwargs=kafka_client_kwargs(settings))
            log.info("broker_ready", bootstrap_servers=broker.bootstrap_servers, storage="memory (lost on exit)",
                     topics_created=created, partitions=args.partitions)
            await stop.wait()
            log.info("broker_stopping")

    asyncio.run(serve())
    return EXIT_OK


# -- replay ---------------------------------------------------------------------------------------

def cmd_replay(args: argparse.Namespace) -> int:
    from inspector.replay import replay
    from inspector.settings import kafka_client_kwargs

    settings = _settings(args)
    _logging(settings)
    stats = asyncio.run(replay(Path(args.images), topic=settings.topic, camera_id=args.camera_id,
                               client_kwargs=kafka_client_kwargs(settings), rate=args.rate, limit=args.limit,
                               coil_id=args.coil_id))
    print(f"published {stats.frames} frames to {settings.topic} as camera {args.camera_id} "
          f"in {stats.seconds:.2f}s ({stats.skipped} non-image files skipped)")
    return EXIT_OK


# -- demo -----------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from inspector.demo import DemoOptions, run_demo

    settings = _settings(args, log_level=args.log_level or "warning")
    _logging(settings)
    options = DemoOptions(images=Path(args.images) if args.images else None, rate=args.rate, limit=args.limit,
                          port=args.port, timeout_s=args.timeout)
    try:
        return asyncio.run(run_demo(settings, options))
    except Exception as err:  # noqa: BLE001 - a demo ends with one readable line, not a traceback
        from inspector.service import first_error

        cause = first_error(err)
        print(f"inspector demo: failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        return EXIT_FAILED


# -- parser ---------------------------------------------------------------------------------------

def _kafka_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", metavar="HOST:PORT", help="Kafka bootstrap servers (default localhost:9092)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inspector", description="Strip-steel line inspector: Kafka frames in, "
                                     "defect events out.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="serve: consume frames, classify them in micro-batches, publish defect events")
    _kafka_flags(p)
    p.add_argument("--topic", help="frames topic (default strip.frames)")
    p.add_argument("--output-topic", help="defect events topic (default strip.defects)")
    p.add_argument("--dead-letter-topic", help="invalid frames topic (default strip.frames.dlq)")
    p.add_argument("--group-id", help="consumer group (default strip-inspector)")
    p.add_argument("--model-dir", type=Path, help="directory of published model versions (default: bundled model)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1: measured fastest on a shared 2-core box)")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "compile"],
                   help="CPU inference runtime (default onnxruntime; CUDA and --locate use torch)")
    p.add_argument("--max-batch", type=int, help="largest inference batch (default 32)")
    p.add_argument("--max-wait-ms", type=float, help="longest a frame waits for its batch to fill (default 10)")
    p.add_argument("--http-port", type=int, help="/metrics, /live, /ready port (default 9400; 0 = off)")
    p.add_argument("--locate", action="store_true", default=None, help="add class-activation boxes to events")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("broker", help="run a local, memory-only Kafka-compatible broker (tansu) on 127.0.0.1")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--partitions", type=int, default=3, help="partitions of the default topics it creates")
    p.add_argument("--verbose", action="store_true", help="show tansu's own output")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("replay", help="publish a folder of images as a camera would")
    _kafka_flags(p)
    p.add_argument("--images", required=True, help="folder of PNG/JPEG/BMP files (searched recursively)")
    p.add_argument("--topic", help="frames topic (default strip.frames)")
    p.add_argument("--rate", type=float, help="frames per second (default: as fast as possible)")
    p.add_argument("--camera-id", default="cam-1")
    p.add_argument("--coil-id")
    p.add_argument("--limit", type=int, help="publish at most this many frames")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("demo", help="broker + replay + inspector together, with a live summary")
    p.add_argument("--images", help="image folder (default: ../shared/datasets/neu-cls if present, else synthesized)")
    p.add_argument("--rate", type=float, default=200.0, help="frames per second to replay (default 200)")
    p.add_argument("--limit", type=int, help="replay at most this many frames")
    p.add_argument("--port", type=int, help="broker port (default: a free one)")
    p.add_argument("--model-dir", type=Path, help="directory of published model versions (default: bundled model)")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"inspector {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
