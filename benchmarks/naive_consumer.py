"""The baseline a user writes first: one frame at a time, consume → decode → forward at batch 1 → produce.

    python -m benchmarks.naive_consumer --bootstrap-servers 127.0.0.1:9092 --topic frames \\
        --output-topic events --group-id naive --model PATH/TO/VERSION

aiokafka consumer with auto-commit, `cv2.imdecode`, the fused model in eager torch (the checkpoint as
stripnet.checkpoint.load_checkpoint gives it, one intra-op thread like the inspector), `json.dumps` and
a fire-and-forget `producer.send` (not `send_and_wait`, which would make the baseline slower still).
Everything runs on the event loop. It is a benchmark program: no dead letters, no validation, no
backpressure, at-most-once commits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

import cv2
import numpy as np
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stripnet.checkpoint import load_checkpoint
from stripnet.preprocess import normalize


async def serve(args: argparse.Namespace) -> None:
    model, manifest = load_checkpoint(args.model)
    names = manifest.class_names
    consumer = AIOKafkaConsumer(args.topic, bootstrap_servers=args.bootstrap_servers, group_id=args.group_id,
                                auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap_servers)
    await consumer.start()
    await producer.start()
    try:
        async for msg in consumer:
            image = cv2.imdecode(np.frombuffer(msg.value, np.uint8), cv2.IMREAD_GRAYSCALE)
            x = normalize(torch.from_numpy(image).unsqueeze(0), manifest.input)
            with torch.inference_mode():
                probabilities = torch.softmax(model(x), dim=1)[0].tolist()
            headers = {k: v.decode() for k, v in msg.headers}
            best = max(range(len(names)), key=probabilities.__getitem__)
            event = {"frame_id": headers["frame_id"], "camera_id": headers["camera_id"], "label": names[best],
                     "confidence": probabilities[best], "probabilities": dict(zip(names, probabilities, strict=True))}
            await producer.send(args.output_topic, json.dumps(event).encode(), key=msg.key)
    finally:
        await producer.stop()
        await consumer.stop()


async def main_async(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)  # type: ignore[union-attr]
    try:
        await serve(args)
    except asyncio.CancelledError:
        pass  # a signal: exit 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.naive_consumer", description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--output-topic", required=True)
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--model", type=Path, required=True, help="a model version directory (manifest.json ...)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
