"""Example figures for `trainer locate`: the frame with its ground truth, and the heat map with predicted boxes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from schemas.checkpoint import Manifest
from stripnet.cam import frame_map, logits_and_cams
from stripnet.network import RepNet
from stripnet.preprocess import normalize
from trainer.data import ImageSet
from trainer.locate_eval import best_iou, corners
from trainer.locate_report import Annotated, Prediction


def _draw_boxes(ax, boxes: Sequence[Sequence[float]], color: str, style: str = "-") -> None:
    from matplotlib.patches import Rectangle

    for x0, y0, x1, y1 in boxes:  # outline through the outermost pixel centres: frame-sized boxes stay visible
        ax.add_patch(Rectangle((x0, y0), x1 - x0 - 1, y1 - y0 - 1, fill=False, ec=color, lw=1.5, ls=style))


def plot_example(
    image: np.ndarray, heat: np.ndarray, pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]],
    peak: tuple[int, int], title: str, path: Path,
) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(5.0, 2.75))
    left.imshow(image, cmap="gray", vmin=0, vmax=255)
    _draw_boxes(left, gt, "lime")
    left.set_title("ground truth", fontsize=8)
    right.imshow(image, cmap="gray", vmin=0, vmax=255)
    right.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    _draw_boxes(right, gt, "lime", ":")
    _draw_boxes(right, pred, "magenta")
    right.plot(*peak, marker="+", color="white", ms=8, mew=2)
    right.set_title("CAM, predicted boxes", fontsize=8)
    for ax in (left, right):
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    _save_small_png(fig, path)
    plt.close(fig)


def _save_small_png(fig, path: Path) -> None:
    """A 256-colour palette PNG: heat maps in RGB compress poorly, and the figures go into the docs."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(path, optimize=True)


def write_examples(
    model: RepNet, manifest: Manifest, data: ImageSet, items: list[Annotated], preds: list[Prediction],
    chosen: Sequence[int], out_dir: Path,
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    size, written = manifest.input.size, []
    for k in chosen:
        item, pred = items[k], preds[k]
        image = data.images[item.index]
        x = normalize(image[None], manifest.input)
        _, _, cams = logits_and_cams(model, x)
        heat = frame_map(model, cams[0].float().numpy(), (size, size), size)
        gt = [corners(b) for b in item.boxes]
        boxes = [corners(b) for b in pred.boxes]
        title = (f"{Path(data.paths[item.index]).name}: predicted {manifest.class_names[pred.predicted]}, "
                 f"best IoU {best_iou(boxes, gt):.2f}")
        path = out_dir / f"{Path(data.paths[item.index]).stem}-cam.png"  # a figure, not a copy of the image
        plot_example(image.numpy(), heat, boxes, gt, pred.peak, title, path)
        written.append(path)
    return written
