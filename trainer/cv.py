"""`trainer cv`: stratified K-fold cross-validation, so every image is predicted once by a model that never saw it.

The folds are drawn once and saved (`folds.json`). Fold k trains on the other K−1 folds for a fixed number of
epochs (`select="last"`: the held-out fold is scored, never used to choose an epoch) and predicts its own
images. With a teacher recipe, fold k's teacher is trained on fold k's training part only, so no teacher sees
the images its student is scored on. Each fold runs in its own process (`jobs` at a time, `threads` each),
under `out/fold-<k>/`; a fold with `predictions.json` is done and skipped, an interrupted one resumes from
its runs' `last.pt`. The report pools the predictions: per-fold and pooled accuracy, MCC and macro-F1 (mean ±
std over folds), the Wilson 95 % interval of the pooled accuracy, the pooled confusion matrix and every
misclassified file.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from stripnet.checkpoint import load_checkpoint
from trainer.data import ImageSet, load_image_folder
from trainer.figures import plot_validation_curves
from trainer.runlog import read_rows
from trainer.jobs import in_processes
from trainer.evaluate import Metrics, compute_metrics, predict_logits, predictions_doc
from trainer.figures import plot_confusion
from trainer.train import TrainConfig, fit


@dataclass(frozen=True)
class CVConfig:
    data: Annotated[Path, "image folder: one sub-folder per class"]
    out: Annotated[Path, "directory of the folds and the report (a re-run skips finished folds)"]
    recipe: TrainConfig  # the student's recipe; its data, out, split and teacher are set per fold
    teacher: TrainConfig | None = None  # a teacher recipe: one teacher per fold, then KD from it
    folds: Annotated[int, "K, the number of folds"] = 5
    fold_seed: int = 0
    jobs: Annotated[int, "folds trained at the same time, one process each"] = 1
    threads: int = 1  # torch threads per fold process
    limit_per_class: int | None = None


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> list[list[int]]:
    """Per class, shuffle with `seed` and deal the images round-robin into k folds; indices sorted per fold."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    counts = torch.bincount(labels)
    if int(counts.min()) < k:
        raise ValueError(f"{k} folds need at least {k} images per class; the smallest class has {int(counts.min())}")
    gen = torch.Generator().manual_seed(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for cls in range(len(counts)):
        idx = torch.nonzero(labels == cls).flatten()
        for j, i in enumerate(idx[torch.randperm(len(idx), generator=gen)].tolist()):
            folds[(j + offset) % k].append(i)
        offset += len(idx)  # the next class starts where this one stopped, so fold sizes differ by at most one
    return [sorted(f) for f in folds]


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fold_dir(out: Path, k: int) -> Path:
    return out / f"fold-{k}"


def _fold_config(cfg: CVConfig, recipe: TrainConfig, run: Path, split: Path, teacher: Path | None) -> TrainConfig:
    return replace(recipe, data=cfg.data, out=run, split_file=split, select="last", teacher=teacher,
                   threads=cfg.threads, limit_per_class=cfg.limit_per_class, progress=False)


def run_fold(cfg: CVConfig, k: int) -> Path:
    """Train fold k's teacher (if any) and student, then predict the fold's held-out images."""
    here = fold_dir(cfg.out, k)
    done = here / "predictions.json"
    if done.exists():
        return done
    torch.set_num_threads(cfg.threads)
    split = here / "split.json"
    teacher = None
    if cfg.teacher is not None:
        teacher = fit(_fold_config(cfg, cfg.teacher, here / "teacher", split, None)).out / "model"
    student = fit(_fold_config(cfg, cfg.recipe, here / "student", split, teacher))
    model, manifest = load_checkpoint(student.out / "model")
    data = load_image_folder(cfg.data, manifest.input.size, cfg.limit_per_class, manifest.input.color)
    held_out = json.loads(split.read_text())["val"]
    where = {p: i for i, p in enumerate(data.paths)}
    test = data.subset([where[p] for p in held_out])
    probs = torch.softmax(predict_logits(model, test, manifest.input), dim=1)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fold": k} | predictions_doc(test, probs, manifest.class_names), indent=0))
    tmp.replace(done)
    return done


def _write_folds(cfg: CVConfig, data: ImageSet) -> list[list[int]]:
    """Draw the folds once; a re-run must use the same ones, so a saved folds.json wins (and must match)."""
    path = cfg.out / "folds.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if (saved["folds"] != cfg.folds or saved["seed"] != cfg.fold_seed
                or sorted(p for f in saved["paths"] for p in f) != sorted(data.paths)):
            raise ValueError(f"{path} was drawn for other data or another --folds/--fold-seed; use a new --out")
        where = {p: i for i, p in enumerate(data.paths)}
        return [[where[p] for p in fold] for fold in saved["paths"]]
    folds = stratified_folds(data.labels, cfg.folds, cfg.fold_seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"folds": cfg.folds, "seed": cfg.fold_seed,
                                "paths": [[data.paths[i] for i in f] for f in folds]}, indent=0))
    return folds


def cross_validate(cfg: CVConfig) -> dict:
    data = load_image_folder(cfg.data, cfg.recipe.size, cfg.limit_per_class, cfg.recipe.color)
    folds = _write_folds(cfg, data)
    for k, held_out in enumerate(folds):
        split = fold_dir(cfg.out, k) / "split.json"
        split.parent.mkdir(parents=True, exist_ok=True)
        train = sorted(i for j, f in enumerate(folds) if j != k for i in f)
        split.write_text(json.dumps({"seed": cfg.fold_seed, "class_names": data.class_names,
                                     "train": [data.paths[i] for i in train],
                                     "val": [data.paths[i] for i in held_out]}, indent=0))
    (cfg.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    pending = [k for k in range(cfg.folds) if not (fold_dir(cfg.out, k) / "predictions.json").exists()]
    print(f"cv: {cfg.folds} folds of {len(data)} images, {cfg.folds - len(pending)} done; running {pending} "
          f"({cfg.jobs} at a time, {cfg.threads} thread(s) each; per-epoch logs in {cfg.out}/fold-*/*/log.csv)",
          flush=True)
    for k, _ in in_processes(partial(run_fold, cfg), pending, cfg.jobs):
        print(f"cv: fold {k} done", flush=True)
    return write_report(cfg.out)


@dataclass(frozen=True)
class HeldOutPrediction:
    path: str
    fold: int
    true: str
    predicted: str
    confidence: float


def _load_predictions(out: Path) -> tuple[tuple[str, ...], list[HeldOutPrediction]]:
    names: tuple[str, ...] = ()
    preds = []
    for path in sorted(out.glob("fold-*/predictions.json")):
        doc = json.loads(path.read_text())
        names = tuple(doc["class_names"])
        for row in doc["predictions"]:
            best = int(np.argmax(row["probabilities"]))
            preds.append(HeldOutPrediction(row["path"], doc["fold"], row["true"], names[best],
                                           row["probabilities"][best]))
    return names, preds


def _metrics(preds: list[HeldOutPrediction], names: tuple[str, ...]) -> Metrics:
    index = {n: i for i, n in enumerate(names)}
    return compute_metrics(np.array([index[p.true] for p in preds]), np.array([index[p.predicted] for p in preds]),
                           names)


def write_report(out: Path) -> dict:
    """cv.json, cv.md and confusion.png from the folds' predictions."""
    names, preds = _load_predictions(out)
    if not preds:
        raise ValueError(f"no fold predictions under {out}")
    folds = sorted({p.fold for p in preds})
    per_fold = {k: _metrics([p for p in preds if p.fold == k], names) for k in folds}
    pooled = _metrics(preds, names)
    correct = sum(p.true == p.predicted for p in preds)
    spread = {key: _mean_std([getattr(m, key) for m in per_fold.values()]) for key in ("accuracy", "mcc", "macro_f1")}
    wrong = sorted((p for p in preds if p.true != p.predicted), key=lambda p: -p.confidence)
    doc = {
        "n": len(preds), "errors": len(wrong), "folds": len(folds),
        "pooled": pooled.to_dict(), "wilson95": wilson_interval(correct, len(preds)),
        "mean_std": {k: {"mean": m, "std": s} for k, (m, s) in spread.items()},
        "per_fold": {str(k): {"n": m.n, "accuracy": m.accuracy, "mcc": m.mcc, "macro_f1": m.macro_f1}
                     for k, m in per_fold.items()},
        "misclassified": [asdict(p) for p in wrong],
        "config": json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None,
    }
    (out / "cv.json").write_text(json.dumps(doc, indent=1))
    (out / "cv.md").write_text(format_report(doc, names))
    plot_confusion(pooled.confusion, names, out / "confusion.png", f"{out.name}: pooled over {len(folds)} folds")
    plot_validation_curves({f"fold {k} (held out)": read_rows(fold_dir(out, k) / "student") for k in folds},
                           out / "curves.png")
    return doc


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_report(doc: dict, names: tuple[str, ...]) -> str:
    low, high = doc["wilson95"]
    pooled, ms = doc["pooled"], doc["mean_std"]
    lines = [
        f"# Cross-validation: {doc['folds']} folds, {doc['n']} images",
        "",
        f"Pooled accuracy **{pooled['accuracy']:.2%}** ({doc['errors']} errors of {doc['n']}), "
        f"Wilson 95 % interval {low:.2%}–{high:.2%}; MCC {pooled['mcc']:.4f}; macro-F1 {pooled['macro_f1']:.4f}.",
        "",
        "| fold | images | accuracy | MCC | macro-F1 |",
        "|---|---|---|---|---|",
        *(f"| {k} | {f['n']} | {f['accuracy']:.2%} | {f['mcc']:.4f} | {f['macro_f1']:.4f} |"
          for k, f in doc["per_fold"].items()),
        f"| mean ± std | | {ms['accuracy']['mean']:.2%} ± {ms['accuracy']['std']:.2%} | "
        f"{ms['mcc']['mean']:.4f} ± {ms['mcc']['std']:.4f} | {ms['macro_f1']['mean']:.4f} ± {ms['macro_f1']['std']:.4f} |",
        "",
        "Pooled confusion matrix (rows true, columns predicted):",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        *(f"| {name} | " + " | ".join(map(str, row)) + " |" for name, row in zip(names, pooled["confusion"], strict=True)),
        "",
        "Per class (pooled): " + "; ".join(
            f"{name} recall {r['recall']:.2%}, precision {r['precision']:.2%}" for name, r in pooled["per_class"].items()),
        "",
        "Misclassified (most confident first):",
        "",
        "| file | fold | true | predicted | confidence |",
        "|---|---|---|---|---|",
        *(f"| {p['path']} | {p['fold']} | {p['true']} | {p['predicted']} | {p['confidence']:.3f} |"
          for p in doc["misclassified"]),
    ]
    return "\n".join(lines) + "\n"
