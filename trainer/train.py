"""One readable training loop: setup, data, model (or resume), teacher, loop, checkpoint.

Everything it needs comes in one `TrainConfig`; everything it produces lands in `cfg.out`:
config.json, split.json, log.jsonl/log.csv (one row per epoch), last.pt (resume state),
best.pt (best on validation), curves.png, confusion_val.png, metrics.json and model/ (the fused
checkpoint directory the inspector serves).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from schemas.checkpoint import ArchitectureSpec, InputSpec, Manifest
from stripnet.architectures import get_spec
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import RepNet, build_model
from stripnet.preprocess import normalize
from trainer.data import (
    DIHEDRAL, ImageSet, camera_jitter, dihedral_batch, fingerprint, load_image_folder, load_split, save_split,
    stratified_split,
)
from trainer.distill import FrozenTeacher, KDConfig, cache_dihedral_logits, kd_loss
from trainer.evaluate import Metrics, evaluate, plot_confusion, plot_curves
from trainer.state import load_state


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    arch: str = "eg-repvgg"
    epochs: int = 100
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 2  # linear warm-up, then cosine decay to 0, stepped per iteration
    seed: int = 0
    split: tuple[float, ...] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    split_file: Path | None = None  # reuse a saved split instead of drawing one
    input: InputSpec = field(default_factory=InputSpec)
    teacher: Path | None = None  # a checkpoint directory: turns distillation on
    kd: KDConfig = field(default_factory=KDConfig)
    teacher_cache_dir: Path | None = None  # where cached teacher logits are shared between runs
    limit_per_class: int | None = None  # small smoke runs
    threads: int | None = None
    bf16: bool = False  # bf16 autocast on the CPU: ~2.5× faster teacher steps on AVX-512-BF16 here
    # "best": the epoch with the best validation accuracy; "last": the final epoch, so the validation part
    # (a cross-validation fold, or nothing when training on all images) never chooses the model.
    select: Literal["best", "last"] = "best"
    label_smoothing: float = 0.0
    ema_decay: float | None = None  # exponential moving average of the weights (and BN statistics)
    jitter: bool = False  # camera jitter (brightness, contrast, gamma, blur, shift, scale) on top of D4
    model_name: str | None = None
    model_version: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class FitResult:
    out: Path
    best_epoch: int
    val: Metrics | None  # None when there was no validation part
    manifest: Manifest
    seconds: float


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def prepare_data(cfg: TrainConfig) -> tuple[ImageSet, ImageSet, str]:
    """Load the folder, draw or reuse the split, save it with the run; returns (train, val, fingerprint).

    A split of one part (`split=(1.0,)`) trains on every image and leaves the validation set empty.
    """
    data = load_image_folder(cfg.data, cfg.input.size, cfg.limit_per_class)
    parts = load_split(cfg.split_file, data) if cfg.split_file else stratified_split(data.labels, cfg.split, cfg.split_seed)
    save_split(cfg.out / "split.json", data, parts, cfg.split_seed)
    val = parts[1] if len(parts) > 1 else []
    return data.subset(parts[0]), data.subset(val), fingerprint(data)


def teacher_logits(cfg: TrainConfig, train: ImageSet) -> tuple[torch.Tensor, str]:
    """(8, N, C) teacher logits for every D4 variant of the training images, cached by teacher and data."""
    teacher_model, manifest = load_checkpoint(cfg.teacher)
    cache_dir = cfg.teacher_cache_dir or cfg.out
    key = f"{manifest.weights_sha256[:16]}-{fingerprint(train)[:16]}"
    cache = cache_dir / f"teacher-logits-{key}.pt"
    if cache.exists():
        return load_state(cache)["logits"], manifest.model_name
    logits = cache_dihedral_logits(
        FrozenTeacher(teacher_model), train.images, lambda x: normalize(x, cfg.input),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"logits": logits}, tmp)
    tmp.replace(cache)  # runs sharing the cache never read a half-written file
    return logits, manifest.model_name


def _ema_step(decay: float):
    """EMA update with timm's warm-up: the decay grows as (1+n)/(10+n) up to `decay`, so early weights fade fast."""
    def step(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = torch.clamp((1 + n) / (10 + n), max=decay)
        return averaged * d + current * (1 - d)
    return step


def _state(model, opt, epoch, step, best, gen, cfg_spec: ArchitectureSpec, classes, ema) -> dict:
    """Everything a resume needs. "model" holds the weights a checkpoint is made from (the EMA when on)."""
    return {
        "model": (ema.module if ema is not None else model).state_dict(), "train_model": model.state_dict(),
        "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "best": best, "rng": gen.get_state(),
        "arch": cfg_spec.model_dump(mode="json"), "class_names": list(classes),
        "ema": ema.state_dict() if ema is not None else None,
    }


@torch.no_grad()
def _validate(model: RepNet, val: ImageSet, cfg: TrainConfig) -> tuple[float, float]:
    if not len(val):
        return math.nan, math.nan
    model.eval()
    logits = torch.cat([
        model(normalize(val.images[i:i + 128], cfg.input))
        for i in range(0, len(val), 128)
    ])
    return F.cross_entropy(logits, val.labels).item(), (logits.argmax(1) == val.labels).float().mean().item()


def fit(cfg: TrainConfig) -> FitResult:
    # ---- setup: the run directory describes itself
    t_start = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    (cfg.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))

    # ---- data: uint8 (N, 200, 200) in memory; normalization happens per batch
    train, val, data_fp = prepare_data(cfg)
    prep = lambda x: normalize(x, cfg.input)  # noqa: E731

    # ---- model, or resume from the last finished epoch
    spec = get_spec(cfg.arch)
    model = build_model(spec, len(train.class_names))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ema = (torch.optim.swa_utils.AveragedModel(model, avg_fn=_ema_step(cfg.ema_decay), use_buffers=True)
           if cfg.ema_decay else None)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    start_epoch, step, best = 0, 0, {"val_acc": -1.0, "val_loss": math.inf, "epoch": -1}
    if (cfg.out / "last.pt").exists():
        state = load_state(cfg.out / "last.pt")
        model.load_state_dict(state["train_model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, step, best = state["epoch"] + 1, state["step"], state["best"]
        tqdm.write(f"resuming {cfg.out} at epoch {start_epoch + 1}")
    rows = _read_log(cfg.out / "log.jsonl")[:start_epoch]  # drop rows of an epoch that never saved its state
    for name in ("log.jsonl", "log.csv"):
        (cfg.out / name).unlink(missing_ok=True)
    for row in rows:
        _append_log(cfg.out, row)

    # ---- teacher: logits for every augmentation, computed once
    soft, teacher_name = (teacher_logits(cfg, train) if cfg.teacher else (None, None))

    # ---- loop
    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"{cfg.arch} seed {cfg.seed}", unit="epoch",
               initial=start_epoch, total=cfg.epochs, disable=not cfg.progress)
    for epoch in bar:
        model.train()
        t0, sums = time.perf_counter(), {"loss": 0.0, "kd": 0.0, "ce": 0.0, "correct": 0}
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            ks = torch.randint(0, DIHEDRAL, (len(idx),), generator=gen)  # one D4 element per image
            pixels = dihedral_batch(train.images[idx], ks)
            x, y = prep(camera_jitter(pixels, gen) if cfg.jitter else pixels), train.labels[idx]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, cfg.lr)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(x)
            logits = logits.float()
            if soft is not None:
                parts = kd_loss(logits, soft[ks, idx], y, cfg.kd, cfg.label_smoothing)
            else:
                ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                parts = {"loss": ce, "ce": ce.detach(), "kd": torch.zeros(())}
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            for key in ("loss", "kd", "ce"):
                sums[key] += parts[key].item() * len(idx)
            sums["correct"] += (logits.argmax(1) == y).sum().item()

        scored = ema.module if ema is not None else model
        val_loss, val_acc = _validate(scored, val, cfg)
        row = {
            "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": sums["loss"] / len(train),
            "train_ce": sums["ce"] / len(train), "train_kd": sums["kd"] / len(train),
            "train_acc": sums["correct"] / len(train), "val_loss": val_loss, "val_acc": val_acc,
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        _append_log(cfg.out, row)
        state = _state(model, opt, epoch, step, best, gen, spec, train.class_names, ema)
        if cfg.select == "last" or (val_acc, -val_loss) > (best["val_acc"], -best["val_loss"]):
            best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch + 1}
            state["best"] = best
            torch.save(state, cfg.out / "best.pt")
        torch.save(state, cfg.out / "last.pt")
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{val_acc:.4f}", best=f"{best['val_acc']:.4f}")
        if not cfg.progress:
            print(f"epoch {epoch + 1}/{cfg.epochs} " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
                  flush=True)

    # ---- checkpoint: the selected epoch, fused, with its validation metrics (none without a validation part)
    model.load_state_dict(load_state(cfg.out / "best.pt")["model"])
    plot_curves(rows, cfg.out / "curves.png", title=f"{cfg.arch} ({'KD' if cfg.teacher else 'no KD'}), seed {cfg.seed}")
    metrics, scores = None, {"epochs": float(best["epoch"])}
    if len(val):
        metrics = evaluate(model, val, cfg.input, train.class_names)
        (cfg.out / "metrics.json").write_text(json.dumps(metrics.to_dict() | {"best_epoch": best["epoch"]}, indent=1))
        plot_confusion(metrics.confusion, train.class_names, cfg.out / "confusion_val.png", "validation")
        scores |= {"val_accuracy": metrics.accuracy, "val_mcc": metrics.mcc, "val_macro_f1": metrics.macro_f1,
                   "best_epoch": best["epoch"]}
    model_dir = cfg.out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    manifest = export_checkpoint(
        model, model_dir, class_names=train.class_names,
        model_name=cfg.model_name or (f"kd-{cfg.arch}" if cfg.teacher else cfg.arch), model_version=cfg.model_version,
        input_spec=cfg.input, metrics=scores,
        data_fingerprint=data_fp, teacher=teacher_name,
    )
    return FitResult(cfg.out, best["epoch"], metrics, manifest, time.perf_counter() - t_start)


def _append_log(out: Path, row: dict) -> None:
    with (out / "log.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    path = out / "log.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

