"""`trainer locate`: run the CAM boxes over an image set with VOC boxes, score them, draw examples."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from schemas.checkpoint import Manifest
from schemas.messages import Box
from stripnet.cam import LocateConfig, boxes_from_map, frame_map, logits_and_cams
from stripnet.network import RepNet
from stripnet.preprocess import normalize
from trainer.data import ImageSet
from trainer.locate_eval import ClassScore, ImageScore, corners, score_image, summarize_by_class
from trainer.voc import GtBox, annotation_path, read_voc


@dataclass(frozen=True)
class Annotated:
    index: int  # into the ImageSet
    boxes: tuple[GtBox, ...]  # in model-input pixels


@dataclass(frozen=True)
class Prediction:
    predicted: int
    peak: tuple[int, int]  # (x, y) of the map's maximum
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class LocateReport:
    model: str
    config: LocateConfig
    images: int
    skipped_unannotated: int
    rows: dict[str, ClassScore]
    baseline: dict[str, ClassScore]  # whole frame as the box, frame centre as the peak

    def to_dict(self) -> dict:
        return asdict(self)


def collect_annotations(data: ImageSet, boxes_dir: Path, size: int) -> tuple[list[Annotated], int]:
    """Annotated images with their boxes scaled to size×size; the count of images without an annotation."""
    found, skipped = [], 0
    for i, rel in enumerate(data.paths):
        path = annotation_path(boxes_dir, rel)
        voc = read_voc(path) if path.is_file() else None
        if voc is None or not voc.boxes:
            skipped += 1
            continue
        sx, sy = size / voc.width, size / voc.height
        found.append(Annotated(i, tuple(b.scaled(sx, sy) for b in voc.boxes)))
    return found, skipped


def predict(
    model: RepNet, images: torch.Tensor, manifest: Manifest, config: LocateConfig, batch_size: int = 32,
) -> list[Prediction]:
    size, out = manifest.input.size, []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size], manifest.input)
        _, classes, cams = logits_and_cams(model, x)
        for cls, cam in zip(classes.tolist(), cams.float().cpu().numpy()):
            heat = frame_map(model, cam, (size, size), size, config.step)
            row, col = np.unravel_index(int(heat.argmax()), heat.shape)
            peak = (int(col) * config.step, int(row) * config.step)
            out.append(Prediction(cls, peak, boxes_from_map(heat, config, (size, size))))
    return out


def score_all(
    data: ImageSet, items: list[Annotated], preds: list[Prediction], class_names: tuple[str, ...], size: int,
) -> tuple[list[ImageScore], list[ImageScore]]:
    """Scores of the predictions and of the whole-frame / frame-centre baseline."""
    scores, baseline = [], []
    frame, centre = [(0, 0, size, size)], (size // 2, size // 2)
    for item, pred in zip(items, preds, strict=True):
        name = data.class_names[int(data.labels[item.index])]
        gt = [corners(b) for b in item.boxes]
        correct = class_names[pred.predicted] == name
        scores.append(score_image(name, correct, pred.peak, [corners(b) for b in pred.boxes], gt))
        baseline.append(score_image(name, correct, centre, frame, gt))
    return scores, baseline


def run_locate(
    model: RepNet, manifest: Manifest, data: ImageSet, boxes_dir: Path, config: LocateConfig,
) -> tuple[LocateReport, list[Annotated], list[Prediction]]:
    unknown = [n for n in data.class_names if n not in manifest.class_names]
    if unknown:
        raise ValueError(f"the data has classes the model does not know: {unknown}")
    size = manifest.input.size
    items, skipped = collect_annotations(data, boxes_dir, size)
    if not items:
        raise ValueError(f"none of the {len(data)} images has an annotation in {boxes_dir}")
    preds = predict(model, data.images[[a.index for a in items]], manifest, config)
    scores, baseline = score_all(data, items, preds, manifest.class_names, size)
    report = LocateReport(
        model=f"{manifest.model_name} {manifest.model_version}", config=config, images=len(items),
        skipped_unannotated=skipped, rows=summarize_by_class(scores, data.class_names),
        baseline=summarize_by_class(baseline, data.class_names),
    )
    return report, items, preds


def pick_examples(data: ImageSet, items: list[Annotated], per_class: int, seed: int = 0) -> list[int]:
    """Positions in `items`: `per_class` drawn at random (seeded) from each class."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(len(data.class_names)):
        pool = [k for k, a in enumerate(items) if int(data.labels[a.index]) == label]
        chosen += sorted(rng.choice(pool, size=min(per_class, len(pool)), replace=False).tolist())
    return chosen


def format_table(report: LocateReport) -> str:
    lines = [
        f"{report.model}: {report.images} annotated images ({report.skipped_unannotated} without annotation skipped), "
        f"threshold {report.config.threshold}, step {report.config.step}",
        f"{'class':<16} {'images':>6} {'acc':>6} {'pointing':>8} {'pt±15':>6} {'best IoU':>8} {'GT boxes':>8} "
        f"{'R@0.5':>6} {'boxes/img':>9} | {'base pt':>7} {'pt±15':>6} {'base IoU':>8} {'base R':>6}",
    ]
    for name, row in report.rows.items():
        base = report.baseline[name]
        lines.append(
            f"{name:<16} {row.images:>6} {row.accuracy:>6.3f} {row.pointing:>8.3f} {row.pointing_tolerant:>6.3f} "
            f"{row.mean_best_iou:>8.3f} {row.gt_boxes:>8} {row.recall:>6.3f} {row.boxes_per_image:>9.2f} | "
            f"{base.pointing:>7.3f} {base.pointing_tolerant:>6.3f} {base.mean_best_iou:>8.3f} {base.recall:>6.3f}"
        )
    return "\n".join(lines)
