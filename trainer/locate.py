"""`trainer locate`: the CAM boxes of stripnet.cam over an image set with Pascal VOC boxes, scored, with figures.

Predicted boxes are the contract's `schemas.messages.Box`; ground truth and scoring work on corners
(x0, y0, x1, y1), half-open pixel boxes in model-input pixels. Definitions:
- pointing game: the map's peak pixel (col, row) lies inside any ground-truth box of the image; the
  tolerant variant (Zhang et al., 2016: 15 px) also counts a peak within that distance of a box;
- best IoU of an image: the largest IoU over all (predicted, ground-truth) pairs, 0 without predictions;
- recall at IoU t: ground-truth boxes matched one-to-one (greedy by IoU) by a predicted box with IoU >= t.
The baseline takes the whole frame as the box and the frame centre as the peak.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from schemas.checkpoint import Manifest
from schemas.messages import Box
from stripnet.boxhead import to_frame_boxes
from stripnet.cam import (LocateConfig, Pass, boxes_from_map, frame_map, head_detections, one_pass, upsample_cam,
                          uses_head)
from stripnet.network import RepNet
from stripnet.preprocess import normalize
from trainer.data import ImageSet
from trainer.figures import figure
from trainer.voc import Corners, annotation_path, read_voc

# --- scoring: pure functions on corners ------------------------------------------------------------------


def corners(box: Box) -> Corners:
    return box.x0, box.y0, box.x1, box.y1


def as_array(boxes: Iterable[Sequence[float]]) -> np.ndarray:
    return np.asarray([tuple(b)[:4] for b in boxes], dtype=np.float64).reshape(-1, 4)


def iou_matrix(pred: Iterable[Sequence[float]], gt: Iterable[Sequence[float]]) -> np.ndarray:
    """(P, G) intersection over union; empty boxes have IoU 0 with everything."""
    a, b = as_array(pred), as_array(gt)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    return float(iou_matrix([a], [b])[0, 0])


def pointing_hit(point: tuple[float, float], gt: Iterable[Sequence[float]], tolerance: float = 0.0) -> bool:
    """`point` is (x, y) = (column, row) of the peak pixel; a hit lies in a box or within `tolerance` pixels
    (Euclidean) of its pixels, the last of which is (x1 - 1, y1 - 1)."""
    x, y = point
    boxes = as_array(gt)
    if tolerance <= 0:
        return any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in boxes)
    dx = np.maximum.reduce([boxes[:, 0] - x, np.zeros(len(boxes)), x - (boxes[:, 2] - 1)])
    dy = np.maximum.reduce([boxes[:, 1] - y, np.zeros(len(boxes)), y - (boxes[:, 3] - 1)])
    return bool(np.any(np.hypot(dx, dy) <= tolerance))


def best_iou(pred: Iterable[Sequence[float]], gt: Iterable[Sequence[float]]) -> float:
    m = iou_matrix(pred, gt)
    return float(m.max()) if m.size else 0.0


def matched_at(pred: Iterable[Sequence[float]], gt: Iterable[Sequence[float]], threshold: float = 0.5) -> int:
    """How many ground-truth boxes a one-to-one greedy matching (highest IoU first) covers at IoU >= threshold."""
    m = iou_matrix(pred, gt)
    pairs = sorted(((m[i, j], i, j) for i, j in zip(*np.nonzero(m >= threshold))), reverse=True)
    used_p, used_g = set(), set()
    for _, i, j in pairs:
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
    return len(used_g)


@dataclass(frozen=True)
class ImageScore:
    class_name: str
    correct: bool  # the predicted class was the true one
    hit: bool
    hit_tolerant: bool
    best_iou: float
    gt_boxes: int
    matched: int
    predicted_boxes: int


def score_image(
    class_name: str, correct: bool, peak: tuple[float, float], pred: Sequence[Corners], gt: Sequence[Corners],
    iou_threshold: float = 0.5, tolerance: float = 15.0,
) -> ImageScore:
    return ImageScore(
        class_name=class_name, correct=correct, hit=pointing_hit(peak, gt),
        hit_tolerant=pointing_hit(peak, gt, tolerance), best_iou=best_iou(pred, gt),
        gt_boxes=len(gt), matched=matched_at(pred, gt, iou_threshold), predicted_boxes=len(pred),
    )


@dataclass(frozen=True)
class ClassScore:
    images: int
    accuracy: float
    pointing: float
    pointing_tolerant: float  # within 15 px of a box
    mean_best_iou: float
    gt_boxes: int
    recall: float  # at the IoU threshold of the scoring
    precision: float  # served boxes matched to a ground-truth box at that threshold, of all served boxes
    boxes_per_image: float


def summarize(scores: Sequence[ImageScore]) -> ClassScore:
    n = len(scores)
    gt, served = sum(s.gt_boxes for s in scores), sum(s.predicted_boxes for s in scores)
    mean = (lambda values: float(np.mean(values)) if n else 0.0)
    return ClassScore(
        images=n, accuracy=mean([s.correct for s in scores]), pointing=mean([s.hit for s in scores]),
        pointing_tolerant=mean([s.hit_tolerant for s in scores]),
        mean_best_iou=mean([s.best_iou for s in scores]), gt_boxes=gt,
        recall=sum(s.matched for s in scores) / gt if gt else 0.0,
        precision=sum(s.matched for s in scores) / served if served else 0.0,
        boxes_per_image=mean([s.predicted_boxes for s in scores]),
    )


def summarize_by_class(scores: Sequence[ImageScore], class_names: Sequence[str]) -> dict[str, ClassScore]:
    """One row per class in `class_names` order, then 'overall' (micro: every image and box counts once)."""
    rows = {name: summarize([s for s in scores if s.class_name == name]) for name in class_names}
    return rows | {"overall": summarize(scores)}


# --- running over an image set -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Annotated:
    index: int  # into the ImageSet
    boxes: tuple[Corners, ...]  # in model-input pixels


@dataclass(frozen=True)
class Localization:
    predicted: int
    peak: tuple[int, int]  # (x, y) of the map's maximum
    boxes: tuple[Box, ...]  # as served
    ranked: np.ndarray  # (k, 5) x0, y0, x1, y1, score, best first: what the mean average precision ranks


@dataclass(frozen=True)
class LocateReport:
    model: str
    method: str  # "head" (the localization head) or "cam"
    config: LocateConfig
    images: int
    skipped_unannotated: int
    rows: dict[str, ClassScore]
    baseline: dict[str, ClassScore]  # whole frame as the box, frame centre as the peak
    map: dict  # mAP@0.5 and @0.5:0.95, overall and per class (`mean_average_precision`)
    baseline_map: dict

    def to_dict(self) -> dict:
        return asdict(self)


def collect_annotations(data: ImageSet, boxes_dir: Path, size: int) -> tuple[list[Annotated], int]:
    """Annotated images with their boxes scaled to size×size; the count of images without an annotation."""
    found, skipped = [], 0
    for i, rel in enumerate(data.paths):
        path = annotation_path(boxes_dir, rel)
        voc = read_voc(path) if path.is_file() else None
        if voc is None or not voc.objects:
            skipped += 1
            continue
        sx, sy = size / voc.width, size / voc.height
        found.append(Annotated(i, tuple((x0 * sx, y0 * sy, x1 * sx, y1 * sy)
                                        for x0, y0, x1, y1 in (o.corners for o in voc.objects))))
    return found, skipped


RANKED_SCORE, RANKED_MAX = 0.01, 20  # the head's detections that mAP ranks: every centre above 1 %, 20 at most


def localize(
    model: RepNet, images: torch.Tensor, manifest: Manifest, config: LocateConfig, batch_size: int = 32,
) -> list[Localization]:
    size, out = manifest.input.size, []
    head = uses_head(model, config)
    for start in range(0, len(images), batch_size):
        with torch.inference_mode():
            found = one_pass(model, normalize(images[start:start + batch_size], manifest.input))
        if head:
            out += _head_localizations(model, found, size)
            continue
        for cls, cam in zip(found.classes.tolist(), found.cams.float().cpu().numpy()):
            heat = frame_map(model, cam, (size, size), size, config.step)
            row, col = np.unravel_index(int(heat.argmax()), heat.shape)
            boxes = boxes_from_map(heat, config, (size, size))
            out.append(Localization(cls, (int(col) * config.step, int(row) * config.step), boxes,
                                    as_ranked([(*corners(b), b.score) for b in boxes])))
    return out


def _head_localizations(model: RepNet, found: Pass, size: int) -> list[Localization]:
    ranked = head_detections(model, found, size, RANKED_SCORE, RANKED_MAX)
    served = to_frame_boxes(head_detections(model, found, size), [(size, size)] * len(found.classes), size)
    return [Localization(cls, peak, boxes, np.column_stack([c, s]).reshape(-1, 5))
            for cls, peak, boxes, c, s in zip(found.classes.tolist(), ranked.peaks, served, ranked.corners,
                                              ranked.scores, strict=True)]


def method_of(model: RepNet, config: LocateConfig) -> str:
    return "head" if uses_head(model, config) else "cam"


def as_ranked(rows: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def mean_average_precision(ranked: Sequence[np.ndarray], predicted: Sequence[int], truth: Sequence[Sequence[Corners]],
                           labels: Sequence[int], class_names: Sequence[str]) -> dict:
    """mAP@0.5 and mAP@0.5:0.95 (COCO's definitions, by torchmetrics over pycocotools), overall and per class.
    Every box of an image carries the class the classifier chose for it."""
    from torchmetrics.detection import MeanAveragePrecision

    preds = [{"boxes": torch.as_tensor(r[:, :4], dtype=torch.float32), "scores": torch.as_tensor(r[:, 4], dtype=torch.float32),
              "labels": torch.full((len(r),), int(k), dtype=torch.long)} for r, k in zip(ranked, predicted, strict=True)]
    target = [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
               "labels": torch.full((len(b),), int(label), dtype=torch.long)} for b, label in zip(truth, labels, strict=True)]
    doc: dict = {}
    for name, thresholds in (("map_50", [0.5]), ("map_50_95", None)):
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools",
                                      iou_thresholds=thresholds)
        metric.update(preds, target)
        result = metric.compute()
        doc[name] = float(result["map"])
        doc[f"{name}_per_class"] = {class_names[int(c)]: float(v) for c, v in
                                    zip(result["classes"].reshape(-1), result["map_per_class"].reshape(-1))}
    return doc


@dataclass(frozen=True)
class Scored:
    """One image set's localizations and their scores, ready to pool with other sets' (cross-validation folds)."""

    labels: list[int]  # the true class, as the model's index
    truth: list[tuple[Corners, ...]]
    found: list[Localization]
    scores: list[ImageScore]
    baseline: list[ImageScore]
    skipped: int


def score_set(model: RepNet, manifest: Manifest, data: ImageSet, boxes_dir: Path, config: LocateConfig
              ) -> tuple[Scored, list[Annotated]]:
    unknown = [n for n in data.class_names if n not in manifest.class_names]
    if unknown:
        raise ValueError(f"the data has classes the model does not know: {unknown}")
    size = manifest.input.size
    items, skipped = collect_annotations(data, boxes_dir, size)
    if not items:
        raise ValueError(f"none of the {len(data)} images has an annotation in {boxes_dir}")
    found = localize(model, data.images[[a.index for a in items]], manifest, config)
    scores, baseline = [], []
    frame, centre = [(0, 0, size, size)], (size // 2, size // 2)
    labels = [manifest.class_names.index(data.class_names[int(data.labels[a.index])]) for a in items]
    for item, loc, label in zip(items, found, labels, strict=True):
        name, correct = manifest.class_names[label], loc.predicted == label
        scores.append(score_image(name, correct, loc.peak, [corners(b) for b in loc.boxes], item.boxes))
        baseline.append(score_image(name, correct, centre, frame, item.boxes))
    return Scored(labels, [a.boxes for a in items], found, scores, baseline, skipped), items


def pooled_report(model: str, method: str, config: LocateConfig, sets: Sequence[Scored],
                  class_names: tuple[str, ...], size: int) -> LocateReport:
    """One report over every set: images, boxes and detections pooled, as if one model had scored them all."""
    def pool(field: str) -> list:
        return [x for s in sets for x in getattr(s, field)]
    labels, truth, found = pool("labels"), pool("truth"), pool("found")
    predicted = [f.predicted for f in found]
    whole = [as_ranked([(0, 0, size, size, 1.0)])] * len(found)
    present = [n for i, n in enumerate(class_names) if i in set(labels)]
    return LocateReport(
        model=model, method=method, config=config, images=len(found),
        skipped_unannotated=sum(s.skipped for s in sets), rows=summarize_by_class(pool("scores"), present),
        baseline=summarize_by_class(pool("baseline"), present),
        map=mean_average_precision([f.ranked for f in found], predicted, truth, labels, class_names),
        baseline_map=mean_average_precision(whole, predicted, truth, labels, class_names),
    )


def run_locate(
    model: RepNet, manifest: Manifest, data: ImageSet, boxes_dir: Path, config: LocateConfig,
) -> tuple[LocateReport, list[Annotated], list[Localization]]:
    scored, items = score_set(model, manifest, data, boxes_dir, config)
    report = pooled_report(f"{manifest.model_name} {manifest.model_version}", method_of(model, config), config, [scored],
                           manifest.class_names, manifest.input.size)
    return report, items, scored.found


def format_table(report: LocateReport) -> str:
    method = ("localization head" if report.method == "head" else
              f"CAM boxes, threshold {report.config.threshold}, step {report.config.step}")
    lines = [
        f"{report.model}: {report.images} annotated images ({report.skipped_unannotated} without annotation "
        f"skipped), {method}",
        f"{'class':<16} {'images':>6} {'acc':>6} {'mAP50':>6} {'mAP':>6} {'pointing':>8} {'pt±15':>6} "
        f"{'best IoU':>8} {'GT boxes':>8} {'R@0.5':>6} {'P@0.5':>6} {'boxes/img':>9} | {'base mAP50':>10} {'pt':>6} "
        f"{'IoU':>6} {'R@0.5':>6}",
    ]
    for name, row in report.rows.items():
        base = report.baseline[name]
        maps = [m["map_50"] if name == "overall" else m["map_50_per_class"].get(name, float("nan"))
                for m in (report.map, report.baseline_map)]
        strict = report.map["map_50_95"] if name == "overall" else report.map["map_50_95_per_class"].get(name, float("nan"))
        lines.append(
            f"{name:<16} {row.images:>6} {row.accuracy:>6.3f} {maps[0]:>6.3f} {strict:>6.3f} {row.pointing:>8.3f} "
            f"{row.pointing_tolerant:>6.3f} {row.mean_best_iou:>8.3f} {row.gt_boxes:>8} {row.recall:>6.3f} {row.precision:>6.3f} "
            f"{row.boxes_per_image:>9.2f} | {maps[1]:>10.3f} {base.pointing:>6.3f} {base.mean_best_iou:>6.3f} "
            f"{base.recall:>6.3f}"
        )
    return "\n".join(lines)


# --- example figures: the frame with its ground truth, and the heat map with the predicted boxes ---------


def pick_examples(data: ImageSet, items: list[Annotated], per_class: int, seed: int = 0) -> list[int]:
    """Positions in `items`: `per_class` drawn at random (seeded) from each class."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(len(data.class_names)):
        pool = [k for k, a in enumerate(items) if int(data.labels[a.index]) == label]
        chosen += sorted(rng.choice(pool, size=min(per_class, len(pool)), replace=False).tolist())
    return chosen


def _draw_boxes(ax, boxes: Sequence[Sequence[float]], color: str, style: str = "-") -> None:
    from matplotlib.patches import Rectangle

    for x0, y0, x1, y1 in boxes:  # outline through the outermost pixel centres: frame-sized boxes stay visible
        ax.add_patch(Rectangle((x0, y0), x1 - x0 - 1, y1 - y0 - 1, fill=False, ec=color, lw=1.5, ls=style))


def plot_example(
    image: np.ndarray, heat: np.ndarray, pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]],
    peak: tuple[int, int], title: str, path: Path, heat_title: str = "CAM, predicted boxes",
) -> None:
    with figure(path, 1, 2, size=(5.0, 2.75), palette=True) as (fig, (left, right)):
        left.imshow(image, cmap="gray", vmin=0, vmax=255)
        _draw_boxes(left, gt, "lime")
        left.set_title("ground truth", fontsize=8)
        right.imshow(image, cmap="gray", vmin=0, vmax=255)
        right.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        _draw_boxes(right, gt, "lime", ":")
        _draw_boxes(right, pred, "magenta")
        right.plot(*peak, marker="+", color="white", ms=8, mew=2)
        right.set_title(heat_title, fontsize=8)
        for ax in (left, right):
            ax.set_axis_off()
        fig.suptitle(title, fontsize=8)


def write_examples(
    model: RepNet, manifest: Manifest, data: ImageSet, items: list[Annotated], found: list[Localization],
    chosen: Sequence[int], out_dir: Path, config: LocateConfig = LocateConfig(),
) -> list[Path]:
    """One figure per chosen image: ground truth, and the heat map (the head's centre map of the predicted class,
    or the CAM) with the predicted boxes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    size, written, head = manifest.input.size, [], uses_head(model, config)
    for k in chosen:
        item, loc = items[k], found[k]
        image = data.images[item.index]
        with torch.inference_mode():
            one = one_pass(model, normalize(image[None], manifest.input))
        if head:
            centres = one.box_maps[0, loc.predicted].sigmoid().float().numpy()
            heat = upsample_cam(centres, model.boxes.stride, (size, size), size)
        else:
            heat = frame_map(model, one.cams[0].float().numpy(), (size, size), size)
        boxes = [corners(b) for b in loc.boxes]
        title = (f"{Path(data.paths[item.index]).name}: predicted {manifest.class_names[loc.predicted]}, "
                 f"best IoU {best_iou(boxes, item.boxes):.2f}")
        path = out_dir / f"{Path(data.paths[item.index]).stem}-{'head' if head else 'cam'}.png"
        plot_example(image.numpy(), heat, boxes, item.boxes, loc.peak, title, path,
                     "centre heat map, head boxes" if head else "CAM, predicted boxes")
        written.append(path)
    return written
