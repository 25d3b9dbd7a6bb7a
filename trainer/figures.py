"""Figures: the one plotting helper (`figure`); a run's curves and confusion matrix; the results document's
validation curves of several runs, Grad-CAM per class and feature maps (§3.4)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from schemas.checkpoint import InputSpec
from stripnet.cam import frame_map
from stripnet.network import RepNet
from stripnet.preprocess import normalize
from trainer.data import ImageSet


@contextmanager
def figure(path: Path, rows: int = 1, cols: int = 1, *, size: tuple[float, float], dpi: int = 100,
           palette: bool = False) -> Iterator[tuple[Any, Any]]:
    """A matplotlib figure (off-screen) with `rows`×`cols` axes as `plt.subplots` gives them, written to `path`
    when the block ends and closed whatever happens. `palette`: a 256-colour PNG (heat maps in RGB compress
    poorly, and the figures go into the docs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size)
    try:
        yield fig, axes
        fig.tight_layout()
        if palette:
            _save_palette_png(fig, path, dpi)
        else:
            fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def _save_palette_png(fig: Any, path: Path, dpi: int) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256).save(path, optimize=True)


def grad_cam(
    model: nn.Module, x: torch.Tensor, layer: nn.Module, classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM (Selvaraju et al.) at `layer`'s output: ReLU(Σ_k mean_hw(∂y_c/∂A_k) · A_k).

    Works on the training form or the fused network. Returns (maps (N, h, w) unnormalized, classes);
    `classes` defaults to the predicted ones. At the last block of a GAP + linear head it equals the
    CAM up to the factor 1/(h·w) after the ReLU.
    """
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    was_training = model.training
    model.eval()
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.detach().clone().requires_grad_(True))  # clone: x may be an inference tensor
            if classes is None:
                classes = logits.argmax(dim=1)
            logits.gather(1, classes[:, None]).sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    activation = captured[-1]
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1)).detach(), classes.detach()


def plot_confusion(cm: list[list[int]], class_names: tuple[str, ...], path: Path, title: str = "") -> None:
    arr = np.asarray(cm)
    with figure(path, size=(6, 5), dpi=120) as (_, ax):
        ax.imshow(arr, cmap="Blues")
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
        ax.set_yticks(range(len(class_names)), class_names)
        ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
        for (i, j), count in np.ndenumerate(arr):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > arr.max() / 2 else "black")


def plot_curves(rows: list[dict], path: Path, title: str = "") -> None:
    epochs = [r["epoch"] for r in rows]
    with figure(path, 1, 2, size=(10, 4), dpi=120) as (fig, (ax_loss, ax_acc)):
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            ax.plot(epochs, [r[f"train_{metric}"] for r in rows], label="train")
            ax.plot(epochs, [r[f"val_{metric}"] for r in rows], label="validation")
            ax.set(xlabel="epoch", ylabel="loss" if metric == "loss" else "accuracy")
            ax.legend()
        fig.suptitle(title)


def plot_validation_curves(runs: dict[str, list[dict]], path: Path) -> None:
    """Validation accuracy and loss per epoch for every run (the paper's Figure 8, one line per run)."""
    with figure(path, 1, 2, size=(11, 4), dpi=110) as (_, (ax_acc, ax_loss)):
        for label, rows in runs.items():
            epochs = [r["epoch"] for r in rows]
            ax_acc.plot(epochs, [r["val_acc"] for r in rows], label=label, lw=1)
            ax_loss.plot(epochs, [r["val_loss"] for r in rows], label=label, lw=1)
        ax_acc.set(xlabel="epoch", ylabel="validation accuracy", ylim=(0.5, 1.005))
        ax_loss.set(xlabel="epoch", ylabel="validation loss", yscale="log")
        ax_acc.legend(fontsize=7)


def one_per_class(data: ImageSet) -> list[int]:
    return [int(torch.nonzero(data.labels == c).flatten()[0]) for c in range(len(data.class_names))]


def plot_grad_cam(model: RepNet, spec: InputSpec, class_names: tuple[str, ...], data: ImageSet, path: Path) -> None:
    """One image per class: the image, and Grad-CAM at the last block over it, titled with the prediction."""
    idx = one_per_class(data)
    maps, predicted = grad_cam(model, normalize(data.images[idx], spec), model.blocks[-1])
    with figure(path, 2, len(idx), size=(2.1 * len(idx), 4.4)) as (_, axes):
        for col, i in enumerate(idx):
            image = data.images[i].numpy()
            heat = frame_map(model, maps[col].numpy(), image.shape, spec.size)
            axes[0, col].imshow(image, cmap="gray")
            axes[0, col].set_title(data.class_names[data.labels[i]], fontsize=8)
            axes[1, col].imshow(image, cmap="gray")
            axes[1, col].imshow(heat, cmap="jet", alpha=0.45)
            axes[1, col].set_title(f"→ {class_names[predicted[col]]}", fontsize=8)
        for ax in axes.flat:
            ax.axis("off")


@torch.no_grad()
def plot_feature_maps(model: RepNet, spec: InputSpec, data: ImageSet, index: int, path: Path,
                      layers: tuple[int, int] = (0, -2), channels: int = 8) -> None:
    """The first `channels` maps of a shallow and a deep block for one image."""
    outputs: dict[int, torch.Tensor] = {}
    handles = [model.blocks[i].register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, out))
               for i in layers]
    model.eval()(normalize(data.images[index:index + 1], spec))
    for h in handles:
        h.remove()
    with figure(path, len(layers), channels + 1, size=(1.6 * (channels + 1), 1.9 * len(layers))) as (_, axes):
        for row, layer in enumerate(layers):
            fmap = outputs[layer][0].numpy()
            axes[row, 0].imshow(data.images[index].numpy(), cmap="gray")
            axes[row, 0].set_title(f"block{layer % len(model.blocks) + 1}\n{fmap.shape[1]}×{fmap.shape[2]}",
                                   fontsize=7)
            for c in range(channels):
                axes[row, c + 1].imshow(fmap[c], cmap="viridis")
        for ax in axes.flat:
            ax.axis("off")


