"""Cost of `--locate`: images/s of logits only vs logits + CAM vs logits + CAM + boxes, one process, interleaved.

    .venv/bin/python benchmarks/locate_throughput.py --model DIR [--data NEU_CLS] [--batch 32] [--threads 1]

Each round runs every variant once on the same batch (order rotated), so background load hits all alike;
the median over rounds is reported. Without --data the batch is random noise (box counts then differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from stripnet.bundled import resolve_model_dir
from stripnet.cam import LocateConfig, boxes_from_map, frame_map, locate_batch, logits_and_cams
from stripnet.checkpoint import load_checkpoint
from stripnet.preprocess import normalize
from trainer.data import load_image_folder


def _batch(args: argparse.Namespace, manifest) -> torch.Tensor:
    spec = manifest.input
    if not args.data:
        return torch.randn(args.batch, spec.channels, spec.size, spec.size)
    data = load_image_folder(args.data, spec.size)
    pick = torch.linspace(0, len(data) - 1, args.batch).long()  # spread over all classes
    return normalize(data.images[pick], spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, manifest = load_checkpoint(resolve_model_dir(args.model))
    x = _batch(args, manifest)

    def logits_only() -> None:
        with torch.inference_mode():
            model(x)

    _, _, cams = logits_and_cams(model, x)
    cams_np, size = cams.numpy(), x.shape[-1]

    def boxes_only(step: int) -> Callable[[], object]:
        config = LocateConfig(step=step)
        return lambda: [boxes_from_map(frame_map(model, c, (size, size), size, step), config) for c in cams_np]

    variants: dict[str, Callable[[], object]] = {
        "logits": logits_only,
        "logits+cam": lambda: logits_and_cams(model, x),
        "logits+cam+boxes (default, step 4)": lambda: locate_batch(model, x),
        "logits+cam+boxes step 2": lambda: locate_batch(model, x, LocateConfig(step=2)),
        "logits+cam+boxes step 1": lambda: locate_batch(model, x, LocateConfig(step=1)),
        "boxes only, from CAMs (step 4)": boxes_only(4),
        "boxes only, from CAMs (step 1)": boxes_only(1),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds + 3):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            variants[name]()
            if r >= 3:  # warm-up rounds
                times[name].append(time.perf_counter() - t0)
    boxes = locate_batch(model, x).boxes
    base = statistics.median(times["logits"])
    doc = {
        "model": f"{manifest.model_name} {manifest.model_version}", "batch": args.batch, "threads": args.threads,
        "input": "NEU-CLS images" if args.data else "random", "rounds": args.rounds,
        "boxes_per_image": sum(map(len, boxes)) / len(boxes),
        "variants": {
            name: {"ms_per_batch_p50": 1e3 * statistics.median(t), "images_per_s": args.batch / statistics.median(t),
                   "relative_cost": statistics.median(t) / base}
            for name, t in times.items()
        },
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
