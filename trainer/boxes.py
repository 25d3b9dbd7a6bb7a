"""Training the localization head (stripnet/boxhead.py) on a fused model, and scoring it by cross-validation.

First the network's weights do not move: the head learns from the features the served network already
computes. That is cheap: each annotated image's features are computed once per D4 transform (the
dihedral group: flips and quarter turns, under which a steel surface and its boxes look as plausible as
the original) and the head trains on those cached maps. Then, by default, the network and that head train
together for `HeadConfig.finetune_epochs` more, the network's cross-entropy kept in the loss (linear probing,
then fine-tuning: the head starts trained, so the features move towards the boxes without being wrecked by
a random head's first gradients; docs/locate.md has what it gains).

Targets follow CenterNet: per box, a Gaussian peak of 1 at its centre cell on its class's heat map, with
spreads α·(w, h)/6 in cells (TTFNet's elliptical form, α = 0.54), the maximum where boxes overlap, and
the box's offset and log size (in cells) at that cell. The heat maps learn by the penalty-reduced focal
loss (α = 2, β = 4), the offsets and sizes by L1 at centre cells. As in TTFNet, every cell inside a box also
regresses that box (the box of the higher peak where boxes overlap) by GIoU, weighted by its Gaussian
(normalized per box): a served peak one cell off the centre then reads a trained box, not an untrained one.

The served boxes are the centres above one score threshold. With `HeadConfig.class_thresholds`, each class
gets its own (`fit_served_head`): a trial head trained on four fifths of the annotated images picks, for each
class the classifier chose, the threshold of best F1 at IoU 0.5 on the other fifth, and the served head then
trains on all of them. That helped the frozen head, whose crazing and rolled-in scale centres were too weak
for one threshold, but not the fine-tuned one (`boxes-cv` scores both: `thresholds_from_other_folds`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated as Help

import numpy as np
import torch
import torch.nn.functional as F

from schemas.checkpoint import BoxHeadSpec, InputSpec, Manifest
from stripnet.bf16 import cpu_has_bf16
from stripnet.boxhead import BoxHead, cell_boxes
from stripnet.budget import sides
from stripnet.bundled import resolve_model_dir
from stripnet.cam import LocateConfig, head_detections, one_pass
from stripnet.checkpoint import export_checkpoint, load_checkpoint, rewrite_checkpoint
from stripnet.network import RepNet, run_chain
from stripnet.preprocess import normalize
from trainer.data import ImageSet, dihedral, fingerprint, load_image_folder, load_split, stratified_split
from trainer.detector import model_labels, refit_as
from trainer.evaluate import evaluate
from trainer.locate import collect_annotations, matched_at, pooled_report, score_set
from trainer.voc import Corners

GAUSSIAN_ALPHA = 0.54


@dataclass(frozen=True)
class HeadConfig:
    layers: Help[tuple[int, ...], "blocks whose outputs the head reads, finest first"] = (7, 8)
    hidden: Help[int, "channels of the head's 3×3 block"] = 64
    epochs: Help[int, "passes over the training maps"] = 20
    batch_size: int = 64
    lr: Help[float, "peak learning rate of AdamW (cosine decay)"] = 2e-3
    weight_decay: float = 1e-4
    augment: Help[bool, "the 8 D4 transforms of each training image (off: the images as they are)"] = True
    score_threshold: Help[float, "a served centre below this is not a box (every class's, without per-class "
                                 "thresholds)"] = 0.3
    class_thresholds: Help[bool, "a served threshold per class: a trial head trains on 4/5 of the annotated "
                                 "images, each class takes its best F1 at IoU 0.5 on the other 1/5, then the head "
                                 "trains on all of them (twice the time; by CV no better than one threshold once "
                                 "fine-tuned)"] = False
    max_boxes: Help[int, "at most this many served boxes per frame"] = 8
    min_boxes: Help[int, "at least this many served boxes per frame: the head's strongest centres, below the "
                         "threshold if need be (0: none below it; 1, by CV: recall and best IoU up in every fold, "
                         "F1 the same, docs/locate.md)"] = 1
    giou_weight: Help[float, "weight of the GIoU loss of the boxes regressed at every cell inside a box, besides "
                             "L1 at its centre (0: centre cells only; 5, TTFNet's: higher mAP and precision, lower "
                             "recall and best IoU by CV, docs/locate.md)"] = 1.0
    centre_iou: Help[float, "cells where a box, centred there instead, would still overlap it by this IoU are "
                            "centres too (0: its own cell only), so a large box's ambiguous centre gets several, as "
                            "FCOS's centre sampling (0.7, CenterNet's overlap: recall, mAP and best IoU up in both "
                            "folds of a paired CV, docs/locate.md)"] = 0.7
    finetune_epochs: Help[int, "then train the network and the head together for this many passes over the "
                               "annotated images (one D4 transform each), the network's cross-entropy in the loss "
                               "(0: the network stays frozen, its classifier exactly as it was)"] = 100
    finetune_lr: Help[float, "peak learning rate of the network and the head while fine-tuning"] = 1e-3
    label_smoothing: Help[float, "of the cross-entropy term when fine-tuning"] = 0.1
    bf16: Help[bool, "fine-tune under bfloat16 autocast; on by default where the CPU has bf16 dot products"] = field(
        default_factory=cpu_has_bf16)
    seed: int = 0


# --- D4 on boxes ---------------------------------------------------------------------


def dihedral_boxes(boxes: Sequence[Corners], k: int, size: int) -> tuple[Corners, ...]:
    """Half-open corner boxes in an S×S frame moved as `trainer.data.dihedral(image, k)` moves its pixels."""
    out = []
    for x0, y0, x1, y1 in boxes:
        for _ in range(k % 4):  # rot90 over (rows, cols): row r, col c → row S−1−c, col r
            x0, y0, x1, y1 = y0, size - x1, y1, size - x0
        if k >= 4:
            x0, x1 = size - x1, size - x0
        out.append((x0, y0, x1, y1))
    return tuple(out)


# --- targets and loss -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    heat: torch.Tensor  # (N, C, h, w) float
    regression: torch.Tensor  # (N, 4, h, w) offset x, y and log w, h, in cells; set where `centres`
    centres: torch.Tensor  # (N, h, w) bool
    boxes: torch.Tensor  # (N, 4, h, w) corners x0, y0, x1, y1 in cells of the box each cell regresses
    weight: torch.Tensor  # (N, h, w) that box's Gaussian there, summing to 1 over its cells (0: no box)
    objects: torch.Tensor  # (N,) boxes per image

    def take(self, idx: torch.Tensor) -> Targets:
        return Targets(self.heat[idx], self.regression[idx], self.centres[idx], self.boxes[idx], self.weight[idx],
                       self.objects[idx])


def targets(boxes: Sequence[Sequence[Corners]], labels: Sequence[int], num_classes: int, grid: tuple[int, int],
            stride: int, centre_iou: float = 0.0) -> Targets:
    n, (h, w) = len(boxes), grid
    heat = torch.zeros(n, num_classes, h, w)
    regression = torch.zeros(n, 4, h, w)
    centres = torch.zeros(n, h, w, dtype=torch.bool)
    corners, weight, owner = torch.zeros(n, 4, h, w), torch.zeros(n, h, w), torch.zeros(n, h, w)
    rows, cols = torch.arange(h, dtype=torch.float32)[:, None], torch.arange(w, dtype=torch.float32)[None, :]
    ys, xs = rows.expand(h, w), cols.expand(h, w)
    for k, (image_boxes, label) in enumerate(zip(boxes, labels, strict=True)):
        for x0, y0, x1, y1 in image_boxes:
            cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
            bw, bh = max(x1 - x0, 1.0) / stride, max(y1 - y0, 1.0) / stride
            i, j = min(max(round(cy), 0), h - 1), min(max(round(cx), 0), w - 1)
            sx, sy = max(GAUSSIAN_ALPHA * bw / 6, 0.3), max(GAUSSIAN_ALPHA * bh / 6, 0.3)
            peak = torch.exp(-((cols - j) ** 2) / (2 * sx * sx) - ((rows - i) ** 2) / (2 * sy * sy))
            own = shifted_iou(xs - cx, ys - cy, bw, bh) >= centre_iou if centre_iou else torch.zeros_like(centres[k])
            own[i, j] = True
            heat[k, label] = torch.maximum(heat[k, label], torch.where(own, 1.0, peak))
            regression[k, 0][own], regression[k, 1][own] = cx - xs[own], cy - ys[own]
            regression[k, 2][own], regression[k, 3][own] = math.log(bw), math.log(bh)
            centres[k] |= own
            inside = (cols >= x0 / stride) & (cols <= x1 / stride) & (rows >= y0 / stride) & (rows <= y1 / stride)
            inside[i, j] = True
            mine = torch.where(inside, peak, 0.0)
            won = mine > owner[k]
            owner[k] = torch.where(won, mine, owner[k])
            weight[k] = torch.where(won, mine / mine.sum(), weight[k])
            corners[k, :, won] = torch.tensor([x0, y0, x1, y1])[:, None] / stride
    return Targets(heat, regression, centres, corners, weight, torch.tensor([len(b) for b in boxes]))


def shifted_iou(dx: torch.Tensor, dy: torch.Tensor, w: float, h: float) -> torch.Tensor:
    """IoU of a w × h box with itself moved by (dx, dy)."""
    inter = (w - dx.abs()).clamp(min=0) * (h - dy.abs()).clamp(min=0)
    return inter / (2 * w * h - inter)


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of centres."""
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = heat.eq(1).float()
    loss = -(positive * (1 - p) ** 2 * p.log() + (1 - positive) * (1 - heat) ** 4 * p ** 2 * (1 - p).log())
    return loss.sum() / positive.sum().clamp(min=1)


def head_loss(maps: torch.Tensor, target: Targets, num_classes: int, giou_weight: float) -> torch.Tensor:
    heat = focal_loss(maps[:, :num_classes], target.heat)
    mask = target.centres[:, None].expand_as(target.regression)
    l1 = F.l1_loss(maps[:, num_classes:][mask], target.regression[mask], reduction="sum")
    loss = heat + l1 / target.centres.sum().clamp(min=1)
    if giou_weight:
        loss = loss + giou_weight * dense_giou(maps[:, num_classes:], target) / target.objects.sum().clamp(min=1)
    return loss


def dense_giou(regression: torch.Tensor, target: Targets) -> torch.Tensor:
    """The GIoU loss of the box read at every weighted cell (as `stripnet.boxhead.decode` reads it) against the
    box that cell regresses, weighted: summed, about one per box."""
    from torchvision.ops import generalized_box_iou_loss  # the `train` extra

    n, i, j = torch.nonzero(target.weight, as_tuple=True)
    predicted = cell_boxes(regression[n, :, i, j].T, i, j)
    loss = generalized_box_iou_loss(predicted, target.boxes[n, :, i, j].to(predicted.dtype), reduction="none")
    return (loss * target.weight[n, i, j]).sum()


# --- features of the frozen network ------------------------------------------------------------------------------


@torch.inference_mode()
def features(model: RepNet, images: torch.Tensor, spec: InputSpec, layers: tuple[int, ...],
             batch_size: int = 128) -> list[torch.Tensor]:
    """(N, S, S) uint8 images → one bf16 (N, K, h, w) map per layer: what the head reads, stored compactly."""
    model.eval()
    out: list[list[torch.Tensor]] = [[] for _ in layers]
    for start in range(0, len(images), batch_size):
        _, kept = run_chain(model.blocks, normalize(images[start:start + batch_size], spec), layers)
        for part, layer in zip(out, layers):
            part.append(kept[layer].to(torch.bfloat16))
    return [torch.cat(part) for part in out]


@dataclass(frozen=True)
class BoxSet:
    images: torch.Tensor  # (N, S, S) or (N, 3, S, S) uint8
    labels: tuple[int, ...]  # model class indices
    boxes: tuple[tuple[Corners, ...], ...]  # per image, in model-input pixels

    def take(self, idx: Sequence[int]) -> BoxSet:
        return BoxSet(self.images[list(idx)], tuple(self.labels[i] for i in idx), tuple(self.boxes[i] for i in idx))


def augmented(data: BoxSet, augment: bool) -> BoxSet:
    transforms = range(8) if augment else range(1)
    size = data.images.shape[-1]
    return BoxSet(
        torch.cat([dihedral(data.images, k) for k in transforms]),
        tuple(label for _ in transforms for label in data.labels),
        tuple(dihedral_boxes(b, k, size) for k in transforms for b in data.boxes),
    )


# --- the training loop -------------------------------------------------------------------------------------------


def fit_boxes(model: RepNet, data: BoxSet, spec: InputSpec, cfg: HeadConfig, log: Callable[[str], None] = print,
              annotations: str = "") -> RepNet:
    """A copy of the fused `model` carrying a trained (training-form) localization head for `data`'s boxes: the
    head learns from the frozen network's cached features, then (`cfg.finetune_epochs`) with the network."""
    torch.manual_seed(cfg.seed)
    train = augmented(data, cfg.augment)
    head = BoxHead(model.spec, model.num_classes, head_spec(cfg, len(data.labels), annotations))
    grid = _grid(model, spec, cfg.layers)
    target = targets(train.boxes, train.labels, model.num_classes, grid, head.stride, cfg.centre_iou)
    log(f"boxes: {len(train.labels)} training maps ({len(data.labels)} images × "
        f"{len(train.labels) // len(data.labels)} transforms), network frozen")
    cached = features(model, train.images, spec, cfg.layers)
    _train([{"params": list(head.parameters()), "lr": cfg.lr}], head, cfg.epochs, len(train.labels), cfg, log,
           lambda idx: head_loss(head([c[idx].float() for c in cached]), target.take(idx), model.num_classes,
                                 cfg.giou_weight))
    del cached
    if not cfg.finetune_epochs:
        return with_head(model, head)
    return finetune(with_head(model, head), train, target, len(data.labels), spec, cfg, log)


def finetune(net: RepNet, train: BoxSet, target: Targets, per_image: int, spec: InputSpec, cfg: HeadConfig,
             log: Callable[[str], None]) -> RepNet:
    """`net`'s network and trained head together, on `train`'s maps (`per_image` images, each under its
    transforms) with their box `target` and the classifier's cross-entropy."""
    log(f"boxes: fine-tuning the network and the head, {cfg.finetune_epochs} epochs at lr {cfg.finetune_lr:g}")
    assert net.boxes is not None
    labels = torch.tensor(train.labels)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            out, kept = run_chain(net.blocks, normalize(train.images[idx], spec), cfg.layers)
            ce = F.cross_entropy(net.head(out).float(), labels[idx], label_smoothing=cfg.label_smoothing)
            maps = net.boxes([kept[i] for i in cfg.layers]).float()
        return ce + head_loss(maps, target.take(idx), net.num_classes, cfg.giou_weight)

    trained = [p for name, p in net.named_parameters() if not name.startswith("ood.")]
    # each epoch sees every image once, under one of its transforms drawn at random
    _train([{"params": trained, "lr": cfg.finetune_lr}], net.boxes, cfg.finetune_epochs, per_image, cfg, log, loss,
           draw=lambda: torch.randperm(per_image) + per_image * torch.randint(len(train.labels) // per_image,
                                                                               (per_image,)))
    return net.eval()


def fit_served_head(model: RepNet, data: BoxSet, spec: InputSpec, cfg: HeadConfig, class_names: Sequence[str],
                    log: Callable[[str], None] = print, annotations: str = "") -> RepNet:
    """`fit_boxes` on all of `data`, with its served thresholds chosen per class (`cfg.class_thresholds`) on a
    fifth of `data` that a trial head did not train on."""
    if not cfg.class_thresholds:
        return fit_boxes(model, data, spec, cfg, log, annotations)
    trial_part, check_part = stratified_split(torch.tensor(data.labels), (0.8, 0.2), cfg.seed)
    log(f"boxes: a trial head on {len(trial_part)} images chooses each class's threshold on {len(check_part)} others")
    trial = fit_boxes(model, data.take(trial_part), spec, cfg, log, annotations)
    chosen = choose_thresholds(trial, data.take(check_part), spec, cfg.score_threshold)
    log("boxes: served thresholds " + ", ".join(f"{name} {t:g}" for name, t in zip(class_names, chosen, strict=True)))
    fitted = fit_boxes(model, data, spec, cfg, log, annotations)
    assert fitted.boxes is not None
    fitted.boxes.spec = fitted.boxes.spec.model_copy(update={"class_thresholds": chosen})
    return fitted


THRESHOLD_GRID = tuple(round(0.05 * k, 2) for k in range(1, 13))  # 0.05 … 0.6


def choose_thresholds(model: RepNet, check: BoxSet, spec: InputSpec, default: float) -> tuple[float, ...]:
    """Per class the classifier chose, the grid threshold whose served boxes have the best F1 at IoU 0.5 on
    `check` (images `model`'s head did not train on)."""
    return best_f1_thresholds(*threshold_counts(model, check, spec), default)


@torch.inference_mode()
def threshold_counts(model: RepNet, check: BoxSet, spec: InputSpec) -> np.ndarray:
    """(3, classes, len(THRESHOLD_GRID)): the matched, served and ground-truth boxes of `check`, per class the
    classifier chose and grid threshold."""
    assert model.boxes is not None
    counts = np.zeros((3, model.num_classes, len(THRESHOLD_GRID)))
    for start in range(0, len(check.labels), 64):
        found = one_pass(model.eval(), normalize(check.images[start:start + 64], spec))
        got = head_detections(model, found, spec.size, THRESHOLD_GRID[0])
        for k, cls in enumerate(found.classes.tolist()):
            gt = check.boxes[start + k]
            for t, threshold in enumerate(THRESHOLD_GRID):
                boxes = got.corners[k][got.scores[k] >= threshold]
                counts[:, cls, t] += matched_at(boxes, gt), len(boxes), len(gt)
    return counts


def best_f1_thresholds(matched: np.ndarray, predicted: np.ndarray, truth: np.ndarray,
                       default: float) -> tuple[float, ...]:
    """(classes, len(THRESHOLD_GRID)) counts of matched, served and ground-truth boxes → each class's threshold of
    best F1, the higher one on ties; `default` for a class without ground truth."""
    f1 = 2 * matched / np.maximum(predicted + truth, 1)  # precision M/P and recall M/G → F1 = 2M/(P+G)
    best = [len(THRESHOLD_GRID) - 1 - int(row[::-1].argmax()) for row in f1]
    return tuple(THRESHOLD_GRID[b] if truth[c].any() else default for c, b in enumerate(best))


def _grid(model: RepNet, spec: InputSpec, layers: tuple[int, ...]) -> tuple[int, int]:
    side = sides(model.spec, spec.size)[layers[0]]
    return side, side


def _train(groups: list[dict], head: BoxHead, epochs: int, samples: int, cfg: HeadConfig,
           log: Callable[[str], None], loss_of: Callable[[torch.Tensor], torch.Tensor],
           draw: Callable[[], torch.Tensor] | None = None) -> None:
    """AdamW over the parameter `groups` (each with its peak "lr"), one-cycle cosine decay, `samples` per
    epoch."""
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps = epochs * math.ceil(samples / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, [g["lr"] for g in groups], total_steps=steps,
                                                   pct_start=0.05)
    for epoch in range(1, epochs + 1):
        head.train()
        total, started = 0.0, time.perf_counter()
        for idx in (draw() if draw else torch.randperm(samples)).split(cfg.batch_size):
            loss = loss_of(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        log(f"boxes epoch {epoch}/{epochs} loss={total / samples:.4f} seconds={time.perf_counter() - started:.1f}")


def head_spec(cfg: HeadConfig, fitted_images: int, annotations: str = "") -> BoxHeadSpec:
    own_fields = {"layers", "hidden", "score_threshold", "max_boxes", "min_boxes"}
    return BoxHeadSpec(layers=cfg.layers, hidden=cfg.hidden, score_threshold=cfg.score_threshold,
                       max_boxes=cfg.max_boxes, min_boxes=cfg.min_boxes, fitted_images=fitted_images,
                       annotations=annotations,
                       recipe={k: v for k, v in asdict(cfg).items() if k not in own_fields})


def with_head(model: RepNet, head: BoxHead) -> RepNet:
    """A copy of `model` carrying a copy of `head` as `model.boxes` (export_checkpoint fuses and saves it)."""
    out = copy.deepcopy(model)
    out.boxes = copy.deepcopy(head).eval()
    return out


def box_set(data: ImageSet, boxes_dir: Path, class_names: tuple[str, ...], size: int) -> BoxSet:
    """`data`'s annotated images with their boxes in size×size pixels and their labels as the model's indices."""
    items, _ = collect_annotations(data, boxes_dir, size)
    if not items:
        raise ValueError(f"none of the {len(data)} images has an annotation in {boxes_dir}")
    labels = model_labels(data, class_names)
    return BoxSet(data.images[[a.index for a in items]], tuple(int(labels[a.index]) for a in items),
                  tuple(a.boxes for a in items))


# --- commands: a head for one checkpoint, and a head per fold of a cross-validation run ---------------------------


@dataclass(frozen=True)
class BoxesConfig:
    model: Help[Path, "checkpoint directory ('default': the bundled model), rewritten in place with the head"]
    data: Help[Path, "the image folder the model was trained on"]
    boxes: Help[Path, "folder of Pascal VOC XML files named after the images"]
    split_file: Help[Path | None, "the run's split.json: the head trains on its train part (unset: every "
                                  "annotated image, for a model trained on all of them)"] = None
    head: HeadConfig = HeadConfig()
    threads: Help[int | None, "torch CPU threads"] = None


def fit_checkpoint(cfg: BoxesConfig, log: Callable[[str], None] = print) -> BoxHeadSpec:
    """Train the head of the checkpoint `cfg.model` on its training images' boxes and rewrite it in place."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = resolve_model_dir(cfg.model)
    model, manifest = load_checkpoint(model_dir)
    data = load_image_folder(cfg.data, manifest.input.size, color=manifest.input.color)
    if manifest.data_fingerprint and fingerprint(data) != manifest.data_fingerprint:
        raise ValueError(f"{cfg.data} is not the data {model_dir} was trained on (data fingerprint differs)")
    if cfg.split_file:
        data = data.subset(load_split(cfg.split_file, data)[0])
    train = box_set(data, cfg.boxes, manifest.class_names, manifest.input.size)
    fitted = fit_served_head(model, train, manifest.input, cfg.head, manifest.class_names, log,
                             annotations=Path(cfg.boxes).name)
    if cfg.head.finetune_epochs and manifest.ood is not None:  # the features moved: fit the detector again
        fitted = refit_as(fitted, manifest.class_names, data, None, manifest.input, manifest.ood)
    written = rewrite_checkpoint(fitted, model_dir, manifest)
    assert written.boxes is not None
    return written.boxes


@dataclass(frozen=True)
class BoxesCVConfig:
    cv: Help[Path, "a `trainer cv` run: each fold's head trains on that fold's model and training part, and is "
                   "scored on the fold it never saw"]
    data: Help[Path, "the image folder of that run"]
    boxes: Help[Path, "folder of Pascal VOC XML files named after the images"]
    out: Help[Path, "where the per-fold heads and the report go (resumes: a fold whose model exists is kept, "
                    "and scored with this run's threshold and box limits)"]
    head: HeadConfig = HeadConfig()
    threads: Help[int | None, "torch CPU threads"] = None


def cross_validate_boxes(cfg: BoxesCVConfig, log: Callable[[str], None] = print) -> dict:
    """Head and CAM boxes of every fold, scored on its held-out images, pooled: out/boxes-cv.json and .md."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    folds = sorted(p for p in Path(cfg.cv).glob("fold-*") if (p / "student" / "model").is_dir())
    if not folds:
        raise ValueError(f"{cfg.cv} holds no fold-*/student/model: run `trainer cv` first")
    data, head_sets, cam_sets, per_fold, scored_folds = None, [], [], [], []
    for fold in folds:
        model, manifest = load_checkpoint(fold / "student" / "model")
        data = data or load_image_folder(cfg.data, manifest.input.size, color=manifest.input.color)
        train_idx, test_idx = load_split(fold / "split.json", data)[:2]
        done = Path(cfg.out) / fold.name / "model"
        if not done.is_dir():
            log(f"{fold.name}: training the head on {len(train_idx)} images")
            train = box_set(data.subset(train_idx), cfg.boxes, manifest.class_names, manifest.input.size)
            fitted = fit_served_head(model, train, manifest.input, cfg.head, manifest.class_names, log,
                                     annotations=Path(cfg.boxes).name)
            export_checkpoint(fitted, done, class_names=manifest.class_names,
                              model_name=manifest.model_name, model_version=manifest.model_version,
                              input_spec=manifest.input, recipe=manifest.recipe)
        with_boxes = served_as(load_checkpoint(done)[0], cfg.head)
        test = data.subset(test_idx)
        head_scored, _ = score_set(with_boxes, manifest, test, cfg.boxes, LocateConfig(method="head"))
        cam_scored, _ = score_set(model, manifest, test, cfg.boxes, LocateConfig(method="cam"))
        head_sets.append(head_scored)
        cam_sets.append(cam_scored)
        scored_folds.append((with_boxes, test))
        report = pooled_report(fold.name, "head", LocateConfig(), [head_scored], manifest.class_names,
                               manifest.input.size)
        per_fold.append({"fold": fold.name, "map_50": report.map["map_50"], "map_50_95": report.map["map_50_95"],
                         **{k: getattr(report.rows["overall"], k) for k in ("recall", "mean_best_iou", "pointing")},
                         # on every held-out image, annotated or not: a fine-tuned network must classify as well
                         "accuracy": evaluate(with_boxes, test, manifest.input, manifest.class_names).accuracy,
                         "accuracy_before": evaluate(model, test, manifest.input, manifest.class_names).accuracy,
                         "images": len(test)})
        log(f"{fold.name}: {per_fold[-1]}")
    size, names = manifest.input.size, manifest.class_names
    doc = {"cv": str(cfg.cv), "head": asdict(cfg.head), "folds": per_fold,
           "pooled": {"head": pooled_report("head", "head", LocateConfig(), head_sets, names, size).to_dict(),
                      "cam": pooled_report("cam", "cam", LocateConfig(), cam_sets, names, size).to_dict()}}
    if not cfg.head.class_thresholds and len(scored_folds) > 1:
        doc |= thresholds_from_other_folds(scored_folds, manifest, cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "boxes-cv.json").write_text(json.dumps(doc, indent=2, default=str))
    (Path(cfg.out) / "boxes-cv.md").write_text(cv_markdown(doc))
    return doc


def served_as(model: RepNet, cfg: HeadConfig) -> RepNet:
    """`model` serving its head with `cfg`'s decoding (threshold, box limits): a finished fold is re-scored with
    other served settings without training its head again."""
    assert model.boxes is not None
    model.boxes.spec = model.boxes.spec.model_copy(update={
        "score_threshold": cfg.score_threshold, "max_boxes": cfg.max_boxes, "min_boxes": cfg.min_boxes})
    return model


def thresholds_from_other_folds(folds: list[tuple[RepNet, ImageSet]], manifest: Manifest, cfg: BoxesCVConfig
                                ) -> dict:
    """Thresholds without a trial head: each fold's head (trained with one threshold) serves the threshold of best
    F1 on the other folds' held-out images, never on its own, first one for every class (`other_folds_one_threshold`),
    then one per class (`other_folds_thresholds`); each way scored on its own held-out images, pooled."""
    spec, names = manifest.input, manifest.class_names
    counts = [threshold_counts(model, box_set(test, cfg.boxes, names, spec.size), spec) for model, test in folds]
    doc = {}
    for key, per_class in (("other_folds_one_threshold", False), ("other_folds_thresholds", True)):
        chosen, sets = [], []
        for k, (model, test) in enumerate(folds):
            others = sum(c for j, c in enumerate(counts) if j != k)
            thresholds = best_f1_thresholds(*(others if per_class else one_class(others)), cfg.head.score_threshold)
            served = copy.deepcopy(model)
            assert served.boxes is not None
            served.boxes.spec = served.boxes.spec.model_copy(
                update={"class_thresholds": thresholds} if per_class else {"score_threshold": thresholds[0]})
            sets.append(score_set(served, manifest, test, cfg.boxes, LocateConfig(method="head"))[0])
            chosen.append(dict(zip(names, thresholds, strict=True)) if per_class else thresholds[0])
        doc[key] = {"per_fold": chosen,
                    "pooled": pooled_report("head", "head", LocateConfig(), sets, names, spec.size).to_dict()}
    return doc


def one_class(counts: np.ndarray) -> np.ndarray:
    """`threshold_counts` (3, classes, grid) summed over the classes: (3, 1, grid), for one threshold for all."""
    return counts.sum(axis=1, keepdims=True)


def cv_markdown(doc: dict) -> str:
    """The pooled table (head, CAM, whole frame) and the per-fold spread, as docs/locate.md shows them."""
    head, cam = doc["pooled"]["head"], doc["pooled"]["cam"]
    rows = [("localization head", head["map"], head["rows"]["overall"])]
    crossed = "other_folds_thresholds" in doc  # written with the one-threshold rows, for more than one fold
    if crossed:
        rows += [(f"localization head, {name} from the other folds", doc[key]["pooled"]["map"],
                  doc[key]["pooled"]["rows"]["overall"])
                 for key, name in (("other_folds_one_threshold", "one threshold"),
                                   ("other_folds_thresholds", "per-class thresholds"))]
    rows += [("CAM boxes", cam["map"], cam["rows"]["overall"]),
            ("whole frame", head["baseline_map"], head["baseline"]["overall"])]
    lines = [f"{head['images']} annotated images, each scored by the fold model that never saw it "
             f"({len(doc['folds'])} folds of {doc['cv']})", "",
             "| boxes | mAP@0.5 | mAP@0.5:0.95 | recall@0.5 | precision@0.5 | mean best IoU | pointing game | "
             "boxes/image |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {m['map_50']:.3f} | {m['map_50_95']:.3f} | {r['recall']:.3f} | {r['precision']:.3f} | "
              f"{r['mean_best_iou']:.3f} | {r['pointing']:.3f} | {r['boxes_per_image']:.2f} |" for name, m, r in rows]
    lines += ["", "| class | images | head mAP@0.5 | head recall@0.5 | head precision@0.5 | head mean best IoU | "
              "CAM mean best IoU | whole-frame mean best IoU |", "|---|---|---|---|---|---|---|---|"]
    for name, r in head["rows"].items():
        if name == "overall":
            continue
        lines.append(f"| {name} | {r['images']} | {head['map']['map_50_per_class'].get(name, float('nan')):.3f} | "
                     f"{r['recall']:.3f} | {r['precision']:.3f} | {r['mean_best_iou']:.3f} | "
                     f"{cam['rows'][name]['mean_best_iou']:.3f} | "
                     f"{head['baseline'][name]['mean_best_iou']:.3f} |")
    if crossed:
        lines += _other_folds_table(doc, [f["fold"] for f in doc["folds"]])
    folds = doc["folds"]
    lines += ["", "| fold | mAP@0.5 | mAP@0.5:0.95 | recall@0.5 | mean best IoU | pointing game | accuracy with the "
              "head | accuracy before |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {f['fold']} | {f['map_50']:.3f} | {f['map_50_95']:.3f} | {f['recall']:.3f} | "
              f"{f['mean_best_iou']:.3f} | {f['pointing']:.3f} | {f['accuracy']:.4f} | {f['accuracy_before']:.4f} |"
              for f in folds]
    errors = [round((1 - f[key]) * f["images"]) for key in ("accuracy", "accuracy_before") for f in folds]
    lines.append(f"\nclassification errors on all {sum(f['images'] for f in folds)} held-out images: "
                 f"{sum(errors[:len(folds)])} with the head's network, {sum(errors[len(folds):])} before")
    for key in ("map_50", "recall", "mean_best_iou"):
        values = np.array([f[key] for f in folds])
        lines.append(f"\n{key}: {values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f} "
                     "(mean ± standard deviation over folds)")
    return "\n".join(lines) + "\n"


def _other_folds_table(doc: dict, folds: list[str]) -> list[str]:
    crossed = doc["other_folds_thresholds"]
    rows, chosen = crossed["pooled"]["rows"], crossed["per_fold"]
    lines = ["", "One threshold from the other folds (" + ", ".join(folds) + "): "
             + " / ".join(f"{t:g}" for t in doc["other_folds_one_threshold"]["per_fold"]),
             "", "Per-class thresholds from the other folds (each fold's threshold per class: " + ", ".join(folds) + ")",
             "", "| class | recall@0.5 | precision@0.5 | mean best IoU | thresholds |", "|---|---|---|---|---|"]
    for name in (n for n in chosen[0] if n in rows):  # a class with no held-out image has no row
        r = rows[name]
        lines.append(f"| {name} | {r['recall']:.3f} | {r['precision']:.3f} | {r['mean_best_iou']:.3f} | "
                     + " / ".join(f"{t[name]:g}" for t in chosen) + " |")
    return lines
