"""Metrics and latency of a classifier on an ImageSet; the predictions training validates with."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from schemas.checkpoint import InputSpec
from stripnet.preprocess import normalize
from trainer.data import ImageSet


@dataclass(frozen=True)
class ClassReport:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Metrics:
    n: int
    accuracy: float
    mcc: float
    macro_f1: float
    per_class: dict[str, ClassReport]
    confusion: list[list[int]]  # rows = true class, columns = predicted class

    def to_dict(self) -> dict:
        return asdict(self)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def matthews_corrcoef(cm: np.ndarray) -> float:
    """Multi-class MCC (Gorodkin's R_K) from the confusion matrix; 0 when it is undefined."""
    t, p = cm.sum(axis=1).astype(float), cm.sum(axis=0).astype(float)
    c, s = float(np.trace(cm)), float(cm.sum())
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom > 0 else 0.0


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: tuple[str, ...]) -> Metrics:
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(axis=0), out=np.zeros_like(tp), where=cm.sum(axis=0) > 0)
    recall = np.divide(tp, cm.sum(axis=1), out=np.zeros_like(tp), where=cm.sum(axis=1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    per_class = {
        name: ClassReport(float(precision[i]), float(recall[i]), float(f1[i]), int(cm[i].sum()))
        for i, name in enumerate(class_names)
    }
    return Metrics(
        n=int(cm.sum()), accuracy=float(tp.sum() / max(cm.sum(), 1)), mcc=matthews_corrcoef(cm),
        macro_f1=float(f1.mean()), per_class=per_class, confusion=cm.tolist(),
    )


@torch.inference_mode()
@torch.inference_mode()
def predict_logits(model: nn.Module, data: ImageSet, spec: InputSpec, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    chunks = [
        model(normalize(data.images[i:i + batch_size], spec))
        for i in range(0, len(data), batch_size)
    ]
    return torch.cat(chunks)


def evaluate(model: nn.Module, data: ImageSet, spec: InputSpec, class_names: tuple[str, ...]) -> Metrics:
    """`class_names` are the model's; data labels are mapped onto them by name."""
    index = {name: i for i, name in enumerate(class_names)}
    missing = [n for n in data.class_names if n not in index]
    if missing:
        raise ValueError(f"the data has classes the model does not know: {missing}")
    y_true = np.array([index[data.class_names[y]] for y in data.labels.tolist()])
    y_pred = predict_logits(model, data, spec).argmax(1).numpy()
    return compute_metrics(y_true, y_pred, class_names)


def predictions_doc(data: ImageSet, probabilities: torch.Tensor, class_names: tuple[str, ...]) -> dict:
    """Per image: its path, true class and every class's probability (in `class_names` order)."""
    return {"class_names": list(class_names), "predictions": [
        {"path": path, "true": data.class_names[int(y)], "probabilities": [round(float(v), 7) for v in probs]}
        for path, y, probs in zip(data.paths, data.labels, probabilities, strict=True)
    ]}


@dataclass(frozen=True)
class Latency:
    batch_size: int
    ms_per_batch_p50: float
    ms_per_image: float
    images_per_s: float


@torch.inference_mode()
def measure_latency(model: nn.Module, spec: InputSpec, batch_size: int = 1, iters: int = 50) -> Latency:
    model.eval()
    x = torch.randn(batch_size, spec.channels, spec.size, spec.size).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    for _ in range(5):
        model(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    p50 = float(np.median(times)) * 1e3
    return Latency(batch_size, p50, p50 / batch_size, 1e3 * batch_size / p50)
