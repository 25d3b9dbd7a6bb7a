"""Scoring predicted boxes and map peaks against ground-truth boxes; pure functions, no model, no I/O.

Boxes are (x0, y0, x1, y1) half-open pixel boxes. Definitions:
- pointing game: the map's peak pixel (col, row) lies inside any ground-truth box of the image; the
  tolerant variant (Zhang et al., 2016: 15 px) also counts a peak within that distance of a box;
- best IoU of an image: the largest IoU over all (predicted, ground-truth) pairs, 0 without predictions;
- recall at IoU t: ground-truth boxes matched one-to-one (greedy by IoU) by a predicted box with IoU >= t.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from schemas.messages import Box
from trainer.voc import GtBox

BoxLike = Sequence[float]


def corners(box: Box | GtBox) -> tuple[float, float, float, float]:
    return box.x0, box.y0, box.x1, box.y1


def as_array(boxes: Iterable[BoxLike]) -> np.ndarray:
    arr = np.asarray([tuple(b)[:4] for b in boxes], dtype=np.float64)
    return arr.reshape(-1, 4)


def iou_matrix(pred: Iterable[BoxLike], gt: Iterable[BoxLike]) -> np.ndarray:
    """(P, G) intersection over union; empty boxes have IoU 0 with everything."""
    a, b = as_array(pred), as_array(gt)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def iou(a: BoxLike, b: BoxLike) -> float:
    return float(iou_matrix([a], [b])[0, 0])


def pointing_hit(point: tuple[float, float], gt: Iterable[BoxLike], tolerance: float = 0.0) -> bool:
    """`point` is (x, y) = (column, row) of the peak pixel; a hit lies in a box or within `tolerance` pixels
    (Euclidean) of its pixels, the last of which is (x1 - 1, y1 - 1)."""
    x, y = point
    boxes = as_array(gt)
    if tolerance <= 0:
        return any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in boxes)
    dx = np.maximum.reduce([boxes[:, 0] - x, np.zeros(len(boxes)), x - (boxes[:, 2] - 1)])
    dy = np.maximum.reduce([boxes[:, 1] - y, np.zeros(len(boxes)), y - (boxes[:, 3] - 1)])
    return bool(np.any(np.hypot(dx, dy) <= tolerance))


def best_iou(pred: Iterable[BoxLike], gt: Iterable[BoxLike]) -> float:
    m = iou_matrix(pred, gt)
    return float(m.max()) if m.size else 0.0


def matched_at(pred: Iterable[BoxLike], gt: Iterable[BoxLike], threshold: float = 0.5) -> int:
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
    class_name: str, correct: bool, peak: tuple[float, float], pred: Sequence[BoxLike], gt: Sequence[BoxLike],
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
    boxes_per_image: float


def summarize(scores: Sequence[ImageScore]) -> ClassScore:
    n = len(scores)
    gt = sum(s.gt_boxes for s in scores)
    mean = (lambda values: float(np.mean(values)) if n else 0.0)
    return ClassScore(
        images=n, accuracy=mean([s.correct for s in scores]), pointing=mean([s.hit for s in scores]),
        pointing_tolerant=mean([s.hit_tolerant for s in scores]),
        mean_best_iou=mean([s.best_iou for s in scores]), gt_boxes=gt,
        recall=sum(s.matched for s in scores) / gt if gt else 0.0,
        boxes_per_image=mean([s.predicted_boxes for s in scores]),
    )


def summarize_by_class(scores: Sequence[ImageScore], class_names: Sequence[str]) -> dict[str, ClassScore]:
    """One row per class in `class_names` order, then 'overall' (micro: every image and box counts once)."""
    rows = {name: summarize([s for s in scores if s.class_name == name]) for name in class_names}
    return rows | {"overall": summarize(scores)}
