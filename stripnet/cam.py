"""Where the defect is: class activation maps (CAM) of the fused network, turned into boxes.

The head is global average pooling + one linear layer, so for feature map F (K×h×w) the logit of
class c is mean_hw(Σ_k w_ck F_k) + b_c; the map CAM_c = Σ_k w_ck F_k is therefore exact and comes
from the same forward pass as the logits (no backward pass). Feature cell (i, j) is centred on
input pixel (s·j, s·i), s = the product of the block strides (each stride-2 3×3 conv with padding 1
centres output j on input 2j), so the map is placed on the frame by that affine map, not by a
generic resize. Boxes are the connected components of the map above `threshold` × its maximum.

A model with a localization head (stripnet/boxhead.py) gets that head's boxes instead, from the same pass
(measured far better: docs/locate.md); the CAM stays for figures and for models without one.
Serving calls `locate_batch`; `trainer locate` scores the same boxes against annotations.
Boxes are the contract's `schemas.messages.Box`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import cv2
import numpy as np
import torch
from torch import nn

from schemas.messages import Box
from stripnet.boxhead import Detections, block_strides, decode, to_frame_boxes
from stripnet.network import RepNet, run_chain, stats_of


@dataclass(frozen=True)
class LocateConfig:
    threshold: Annotated[float, "box threshold, as a fraction of the map's maximum"] = 0.5
    score: Annotated[Literal["mean", "max"], "box score: the normalized CAM's mean or maximum inside the box"] = "mean"
    min_area: Annotated[float, "drop components smaller than this fraction of the frame (interpolation specks)"] = 0.01
    max_boxes: Annotated[int, "at most this many boxes per frame, best first"] = 8
    step: Annotated[int, "evaluate the map every STEP frame pixels: boxes snap to that grid, cost falls ~STEP²"] = 4
    method: Annotated[Literal["auto", "head", "cam"], "whose boxes: the localization head's (auto: when the model "
                                                     "has one) or the CAM's components"] = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.min_area < 1.0 or self.max_boxes < 1 or self.step < 1:
            raise ValueError("min_area must be in [0, 1), max_boxes and step >= 1")


@dataclass(frozen=True)
class Located:
    logits: torch.Tensor  # (N, classes)
    classes: torch.Tensor  # (N,) predicted class index
    cams: np.ndarray  # (N, h, w) float32 raw CAM of the predicted class at feature resolution
    boxes: tuple[tuple[Box, ...], ...]  # per image, best score first
    ood_scores: torch.Tensor | None = None  # (N,) the model's unknown detector, if it carries one (stripnet/ood.py)


def feature_stride(model: RepNet) -> int:
    return block_strides(model.spec)[-1]


def class_activation_maps(features: torch.Tensor, fc: nn.Linear, classes: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) features, (N,) class indices → (N, h, w) Σ_k w_ck F_k (bias left out)."""
    weights = fc.weight[classes]  # (N, K)
    return torch.einsum("nkhw,nk->nhw", features, weights)


@torch.inference_mode()
def logits_and_cams(model: RepNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass → (logits, predicted classes, CAM of the predicted class at feature resolution)."""
    found = one_pass(model, x)
    return found.logits, found.classes, found.cams


@dataclass(frozen=True)
class Pass:
    logits: torch.Tensor
    classes: torch.Tensor  # (N,) predicted class index
    cams: torch.Tensor  # (N, h, w) CAM of the predicted class at feature resolution
    ood_scores: torch.Tensor | None  # when the model has an unknown detector
    box_maps: torch.Tensor | None  # (N, C + 4, h', w') when the model has a localization head


def one_pass(model: RepNet, x: torch.Tensor) -> Pass:
    """Logits, classes, CAMs and, with the model's detector and head, unknown scores and box maps, in one pass."""
    ood = model.ood.spec if model.ood is not None else None
    ood_layers, corr_layers = (ood.layers, ood.corr_layers) if ood is not None else ((), ())
    box_layers = model.boxes.spec.layers if model.boxes is not None else ()
    x, kept = run_chain(model.blocks, x, (*box_layers, *ood_layers, *corr_layers))
    logits = model.head.fc(model.head.pool(x))
    classes = logits.argmax(dim=1)
    return Pass(logits, classes, class_activation_maps(x, model.head.fc, classes),
                model.ood(stats_of(kept, ood_layers, corr_layers), logits) if ood_layers else None,
                model.boxes([kept[i] for i in box_layers]) if model.boxes is not None else None)


def uses_head(model: RepNet, config: LocateConfig) -> bool:
    return config.method == "head" or (config.method == "auto" and model.boxes is not None)


def head_detections(model: RepNet, found: Pass, input_size: int, score_threshold: float | None = None,
                    max_boxes: int | None = None) -> Detections:
    """The localization head's boxes of each image's predicted class, in input pixels: as served (the head's own
    score thresholds, per class when it has them, and box limit) unless `score_threshold` or `max_boxes` say
    otherwise."""
    if model.boxes is None or found.box_maps is None:
        raise ValueError("this model has no localization head (fit one with `trainer boxes`)")
    spec = model.boxes.spec
    served = spec.class_thresholds or spec.score_threshold
    return decode(found.box_maps, found.classes, model.boxes.stride, input_size,
                  score_threshold=served if score_threshold is None else score_threshold,
                  max_boxes=spec.max_boxes if max_boxes is None else max_boxes, min_boxes=spec.min_boxes)


def normalize_cam(cam: np.ndarray) -> np.ndarray:
    """ReLU, then divide by the maximum: 0..1; an all-non-positive map becomes all zeros."""
    cam = np.maximum(cam, 0.0, dtype=np.float32)
    peak = float(cam.max())
    return cam / peak if peak > 0 else cam


def upsample_cam(
    cam: np.ndarray, stride: float, frame_size: tuple[int, int], input_size: int, step: int = 1,
) -> np.ndarray:
    """(h, w) map → frame map: cell (i, j) lands on input pixel (stride·j, stride·i), bilinear between,
    edges replicated; a frame of another size than the model input is scaled like the inspector's resize.
    With `step` > 1 the result holds every step-th frame pixel: shape (ceil(H/step), ceil(W/step))."""
    height, width = frame_size
    sx, sy = stride * width / input_size / step, stride * height / input_size / step
    matrix = np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0]], dtype=np.float64)
    return cv2.warpAffine(
        np.ascontiguousarray(cam, dtype=np.float32), matrix, (-(-width // step), -(-height // step)),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
    )


def boxes_from_map(
    cam01: np.ndarray, config: LocateConfig = LocateConfig(), frame_size: tuple[int, int] | None = None,
) -> tuple[Box, ...]:
    """Connected components (8-neighbour) of a 0..1 map at >= threshold × its maximum, best score first.
    The map holds every `config.step`-th pixel of a frame of `frame_size` (default: the map itself)."""
    peak = float(cam01.max()) if cam01.size else 0.0
    if peak <= 0:
        return ()
    mask = (cam01 >= config.threshold * peak).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    step = config.step
    height, width = frame_size or (cam01.shape[0] * step, cam01.shape[1] * step)
    min_pixels = config.min_area * cam01.size
    boxes = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_pixels:
            continue
        inside = cam01[y:y + h, x:x + w][labels[y:y + h, x:x + w] == label]
        score = float(inside.mean() if config.score == "mean" else inside.max())
        boxes.append(Box(x0=x * step, y0=y * step, x1=min((x + w) * step, width), y1=min((y + h) * step, height),
                         score=min(score, 1.0)))
    boxes.sort(key=lambda b: b.score, reverse=True)
    return tuple(boxes[:config.max_boxes])


def frame_map(
    model: RepNet, cam: np.ndarray, frame_size: tuple[int, int], input_size: int, step: int = 1,
) -> np.ndarray:
    """One raw feature-resolution CAM → normalized 0..1 map on the frame (every `step`-th pixel)."""
    return upsample_cam(normalize_cam(cam), feature_stride(model), frame_size, input_size, step)


def locate_batch(
    model: RepNet, x: torch.Tensor, config: LocateConfig = LocateConfig(),
    frame_sizes: Sequence[tuple[int, int]] | None = None,
) -> Located:
    """Logits and boxes (and unknown scores, with a detector) for a batch in one forward pass. `x` is the model
    input (N, C, S, S); `frame_sizes` are the original (height, width) per image (default: S×S), boxes are in
    those pixels. The boxes are the localization head's when the model has one (stripnet/boxhead.py), else
    the CAM's components (`config`)."""
    input_size = x.shape[-1]
    with torch.inference_mode():
        found = one_pass(model, x)
    cams_np = found.cams.float().cpu().numpy()
    sizes = frame_sizes if frame_sizes is not None else [(x.shape[-2], input_size)] * len(cams_np)
    if len(sizes) != len(cams_np):
        raise ValueError(f"{len(sizes)} frame sizes for a batch of {len(cams_np)}")
    if uses_head(model, config):
        boxes = to_frame_boxes(head_detections(model, found, input_size), sizes, input_size)
    else:
        boxes = tuple(boxes_from_map(frame_map(model, cam, size, input_size, config.step), config, size)
                      for cam, size in zip(cams_np, sizes))
    return Located(found.logits, found.classes, cams_np, boxes, found.ood_scores)
