"""One readable training loop: setup, data, model (or resume), teacher, loop, checkpoint.

Everything it needs comes in one `TrainConfig`; everything it produces lands in `cfg.out`:
config.json, split.json, log.jsonl/log.csv (one row per epoch), last.pt (resume state),
best.pt (best on validation), curves.png, confusion_val.png, metrics.json and model/ (the fused
checkpoint directory the inspector serves).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from schemas.checkpoint import ArchitectureSpec, InputSpec, Manifest
from stripnet.architectures import ARCHITECTURES, get_spec
from stripnet.bf16 import cpu_has_bf16
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import RepNet, build_model
from stripnet.preprocess import normalize
from trainer.data import (
    DIHEDRAL, IMBALANCED, Balance, ColorChoice, ImageSet, balance_note, camera_jitter, class_weights,
    dihedral_batch, epoch_order, fingerprint, imbalance, load_image_folder, load_split, save_split, stratified_split,
)
from trainer.detector import DEFAULT_FALSE_UNKNOWN_RATE, fit_detector
from trainer.distill import FrozenTeacher, KDConfig, cache_dihedral_logits, kd_loss
from trainer.evaluate import Metrics, compute_metrics, evaluate, predict_logits
from trainer.figures import plot_confusion, plot_curves
from trainer.options import Opt, parse_split
from trainer.runlog import append_row, read_rows
from trainer.state import load_state


@dataclass(frozen=True)
class TrainConfig:
    """One run's recipe. Every field is a `trainer fit` option (trainer/options.py); the help is here.

    The defaults are the measured recipe (docs/results.md): camera jitter, label smoothing and EMA, which 5-fold CV
    chose on NEU-CLS (99.20 % against 98.83 % without them, at 60 epochs), and the paper's 100 epochs, which 5-fold
    CV on X-SDD scored above 60 (96.80 % against 95.14 %); so the plain command is the measured one."""

    data: Annotated[Path, "image folder: one sub-folder per class"]
    out: Annotated[Path, "run directory (resumes if it holds last.pt)"]
    arch: Annotated[str, Opt("architecture (stripnet/architectures.py)", choices=tuple(ARCHITECTURES))] = "eg-repvgg"
    epochs: int = 100
    batch_size: int = 64
    lr: Annotated[float, "peak learning rate of SGD"] = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: Annotated[int, "linear warm-up epochs, then cosine decay to 0, stepped per iteration"] = 2
    seed: int = 0
    split: Annotated[tuple[float, ...], Opt("train:val[:test], e.g. 8:1:1; one part trains on every image",
                                        parse=parse_split)] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    split_file: Annotated[Path | None, "reuse a split.json from another run instead of drawing one"] = None
    size: Annotated[int | None, "input side in pixels; default: the images' own size, at least --min-size"] = None
    min_size: Annotated[int, "without --size, images smaller than this side are upsampled to it (Table 1's "
                             "network is built for 200×200; on X-SDD, 128→200 scored 3.1 points more by 5-fold "
                             "CV: docs/results.md); 0 keeps any size"] = 200
    color: Annotated[ColorChoice, "model input: rgb when any image has colour (auto), or forced"] = "auto"
    balance: Annotated[Balance, "imbalanced classes: none, class-balanced sampling, or per-class loss weights "
                                "N/(C·n_class); on X-SDD (6:1) 5-fold CV scored none above both "
                                "(docs/results.md)"] = "none"
    teacher: Annotated[Path | None, "teacher checkpoint directory: turns on distillation"] = None
    kd: KDConfig = field(default_factory=KDConfig)
    teacher_cache_dir: Annotated[Path | None, "share cached teacher logits between runs"] = None
    limit_per_class: Annotated[int | None, "use only the first N images of each class (smoke runs)"] = None
    threads: Annotated[int | None, "torch intra-op threads (unset: torch's choice)"] = None
    bf16: Annotated[bool, "bf16 autocast on the CPU (~2.5× faster teacher steps on AVX-512-BF16 here); on by default "
                          "where the CPU has bf16 dot products"] = field(default_factory=cpu_has_bf16)
    select: Annotated[Literal["best", "last"], "checkpoint the epoch best on validation, or the last one, so the "
                      "validation part (a cross-validation fold, or none) never chooses the model"] = "best"
    label_smoothing: float = 0.1
    supcon: Annotated[float, "weight of a supervised contrastive loss (Khosla et al. 2020, one view) on the "
                             "L2-normalized pooled features (0: off; 0.5 left the unknown detector's "
                             "leave-one-class-out AUROC unchanged: docs/openset.md)"] = 0.0
    supcon_temperature: float = 0.1
    ema_decay: Annotated[float | None, Opt("keep an exponential moving average of the weights (and BN statistics) "
                                           "with this decay (0: off)", flag="--ema")] = 0.998
    jitter: Annotated[bool, "camera jitter (brightness, contrast, gamma, blur, shift, scale) on top of D4"] = True
    chosen_by: Annotated[Path | None, "the `trainer cv` run that chose this recipe: its pooled figures go into "
                                     "the manifest"] = None
    false_unknown_rate: Annotated[float, "unknown detector: the share of validation images its threshold flags"] = (
        DEFAULT_FALSE_UNKNOWN_RATE)
    model_name: Annotated[str | None, "the manifest's model_name (unset: from the architecture and KD)"] = None
    model_version: Annotated[str | None, "the manifest's model_version (unset: a UTC stamp)"] = None
    progress: Annotated[bool, "a progress bar rather than plain per-epoch lines"] = True


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


def input_of(data: ImageSet) -> InputSpec:
    """The model input the data were loaded as: their side and colour, 3 channels (gray replicated)."""
    return InputSpec(size=data.size, color=data.color)


def prepare_data(cfg: TrainConfig) -> tuple[ImageSet, ImageSet, str]:
    """Load the folder, draw or reuse the split, save it with the run; returns (train, val, fingerprint).

    A split of one part (`split=(1.0,)`) trains on every image and leaves the validation set empty.
    """
    data = load_image_folder(cfg.data, cfg.size, cfg.limit_per_class, cfg.color, cfg.min_size)
    parts = load_split(cfg.split_file, data) if cfg.split_file else stratified_split(data.labels, cfg.split, cfg.split_seed)
    save_split(cfg.out / "split.json", data, parts, cfg.split_seed)
    val = parts[1] if len(parts) > 1 else []
    return data.subset(parts[0]), data.subset(val), fingerprint(data)


def teacher_logits(cfg: TrainConfig, train: ImageSet, spec: InputSpec) -> tuple[torch.Tensor, str]:
    """(8, N, C) teacher logits for every D4 variant of the training images, cached by teacher and data."""
    teacher_model, manifest = load_checkpoint(cfg.teacher)
    if (manifest.input.size, manifest.input.color) != (spec.size, spec.color):
        raise ValueError(f"teacher {cfg.teacher} takes {manifest.input.color} {manifest.input.size}×"
                         f"{manifest.input.size}, the student's data are {spec.color} {spec.size}×{spec.size}; "
                         "train the teacher on the same --size and --color")
    cache_dir = cfg.teacher_cache_dir or cfg.out
    key = f"{manifest.weights_sha256[:16]}-{fingerprint(train)[:16]}"
    cache = cache_dir / f"teacher-logits-{key}.pt"
    if cache.exists():
        return load_state(cache)["logits"], manifest.model_name
    logits = cache_dihedral_logits(
        FrozenTeacher(teacher_model), train.images, lambda x: normalize(x, manifest.input),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"logits": logits}, tmp)
    tmp.replace(cache)  # runs sharing the cache never read a half-written file
    return logits, manifest.model_name


RECIPE_FIELDS = ("arch", "epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "seed", "select",
                 "label_smoothing", "ema_decay", "jitter", "bf16")


def recipe_of(cfg: TrainConfig) -> dict[str, str | int | float | bool | None]:
    """What shaped the weights, for the manifest: the optimisation settings, and the KD settings with a teacher."""
    recipe = {name: getattr(cfg, name) for name in RECIPE_FIELDS}
    recipe["split"] = ":".join(f"{part:.4g}" for part in cfg.split) if cfg.split_file is None else str(cfg.split_file)
    if cfg.teacher is not None:
        recipe |= {f"kd_{name}": value for name, value in asdict(cfg.kd).items()}
    if cfg.supcon:
        recipe |= {"supcon": cfg.supcon, "supcon_temperature": cfg.supcon_temperature}
    if cfg.chosen_by is not None:
        recipe["chosen_by"] = str(cfg.chosen_by)
    return recipe


def cv_scores(run: Path) -> dict[str, float]:
    """The pooled figures of a `trainer cv` run (cv.json), prefixed cv_."""
    doc = json.loads((run / "cv.json").read_text())
    low, high = doc["wilson95"]
    pooled = doc["pooled"]
    return {"cv_accuracy": pooled["accuracy"], "cv_mcc": pooled["mcc"], "cv_macro_f1": pooled["macro_f1"],
            "cv_errors": float(doc["errors"]), "cv_images": float(doc["n"]), "cv_folds": float(doc["folds"]),
            "cv_accuracy_wilson95_low": low, "cv_accuracy_wilson95_high": high}


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


def _validate(model: RepNet, val: ImageSet, spec: InputSpec) -> tuple[float, float, float]:
    """Validation loss, accuracy and macro-F1, from the predictions `trainer evaluate` makes."""
    if not len(val):
        return math.nan, math.nan, math.nan
    logits = predict_logits(model, val, spec, batch_size=128)
    pred = logits.argmax(1)
    macro_f1 = compute_metrics(val.labels.numpy(), pred.numpy(), val.class_names).macro_f1
    return F.cross_entropy(logits, val.labels).item(), (pred == val.labels).float().mean().item(), macro_f1


def _score(row: dict, by_f1: bool) -> tuple[float, ...]:
    """What "best" means: macro-F1 first with imbalanced classes (then accuracy), accuracy first otherwise;
    ties go to the lower validation loss."""
    acc, f1, loss = row["val_acc"], row.get("val_macro_f1", -1.0), row["val_loss"]
    return (f1, acc, -loss) if by_f1 else (acc, -loss)


def supcon_loss(features: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss over one view: each image's other same-class images in the batch are its
    positives, every other image the denominator. Anchors without a positive are left out."""
    z = F.normalize(features, dim=1)
    sim = (z @ z.T / temperature).fill_diagonal_(-torch.inf)
    log_p = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (y[:, None] == y[None, :]).fill_diagonal_(False)
    count = positive.sum(1)
    mean_log_p = torch.where(positive, log_p, 0.0).sum(1) / count.clamp(min=1)
    return -mean_log_p[count > 0].mean() if (count > 0).any() else features.sum() * 0.0


def loss_parts(logits: torch.Tensor, pooled: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None,
               cfg: TrainConfig, weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The batch's loss and its logged parts: distillation against the teacher's `soft` logits, or cross-entropy,
    plus the supervised contrastive term on the `pooled` features when `cfg.supcon` weighs it."""
    if soft is not None:
        parts = kd_loss(logits, soft, y, cfg.kd, cfg.label_smoothing, weight)
    else:
        ce = F.cross_entropy(logits, y, weight=weight, label_smoothing=cfg.label_smoothing)
        parts = {"loss": ce, "ce": ce.detach(), "kd": torch.zeros(())}
    if cfg.supcon:
        contrastive = supcon_loss(pooled, y, cfg.supcon_temperature)
        parts |= {"loss": parts["loss"] + cfg.supcon * contrastive, "supcon": contrastive.detach()}
    return parts


def train_step(model: RepNet, opt: torch.optim.Optimizer, x: torch.Tensor, bf16: bool,
               loss_of: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step: forward (bf16 autocast if asked), `loss_of` the fp32 logits and pooled features,
    backward, update."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pooled = model.head.pool(model.forward_features(x))
        logits = model.head.fc(pooled)
    logits = logits.float()
    parts = loss_of(logits, pooled.float())
    opt.zero_grad(set_to_none=True)
    parts["loss"].backward()
    opt.step()
    return logits, parts


def fit(cfg: TrainConfig) -> FitResult:
    from tqdm import tqdm  # the `train` extra: the runtime image builds this module's CLI without it

    # ---- setup: the run directory describes itself
    t_start = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    (cfg.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))

    # ---- data: uint8 (N, S, S) gray or (N, 3, S, S) RGB in memory; normalization happens per batch
    train, val, data_fp = prepare_data(cfg)
    input_spec = input_of(train)
    prep = lambda x: normalize(x, input_spec)  # noqa: E731
    by_f1 = imbalance(train.labels) > IMBALANCED
    weight = class_weights(train.labels, len(train.class_names)) if cfg.balance == "loss" else None
    select_note = (f"select by {'macro-F1' if by_f1 else 'accuracy'} on validation" if cfg.select == "best"
                   else "select the last epoch")
    notes = (*train.notes, balance_note(train.labels, cfg.balance), select_note)
    (cfg.out / "input.json").write_text(json.dumps({"input": input_spec.model_dump(), "notes": notes}, indent=1))
    for note in notes:
        tqdm.write(f"{cfg.out.name}: {note}")

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
    rows = read_rows(cfg.out)[:start_epoch]  # drop rows of an epoch that never saved its state
    for name in ("log.jsonl", "log.csv"):
        (cfg.out / name).unlink(missing_ok=True)
    for row in rows:
        append_row(cfg.out, row)

    # ---- teacher: logits for every augmentation, computed once
    soft, teacher_name = (teacher_logits(cfg, train, input_spec) if cfg.teacher else (None, None))

    # ---- loop
    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"{cfg.arch} seed {cfg.seed}", unit="epoch",
               initial=start_epoch, total=cfg.epochs, disable=not cfg.progress)
    for epoch in bar:
        model.train()
        t0, sums = time.perf_counter(), {"loss": 0.0, "kd": 0.0, "ce": 0.0, "supcon": 0.0, "correct": 0}
        perm = epoch_order(train.labels, cfg.balance, gen)
        for i in range(0, len(train), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            ks = torch.randint(0, DIHEDRAL, (len(idx),), generator=gen)  # one D4 element per image
            pixels = dihedral_batch(train.images[idx], ks)
            x, y = prep(camera_jitter(pixels, gen) if cfg.jitter else pixels), train.labels[idx]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, cfg.lr)
            targets = soft[ks, idx] if soft is not None else None
            logits, parts = train_step(model, opt, x, cfg.bf16,
                                       partial(loss_parts, y=y, soft=targets, cfg=cfg, weight=weight))
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            for key, value in parts.items():
                sums[key] += value.item() * len(idx)
            sums["correct"] += (logits.argmax(1) == y).sum().item()

        scored = ema.module if ema is not None else model
        val_loss, val_acc, val_f1 = _validate(scored, val, input_spec)
        row = {
            "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": sums["loss"] / len(train),
            "train_ce": sums["ce"] / len(train), "train_kd": sums["kd"] / len(train),
            **({"train_supcon": sums["supcon"] / len(train)} if cfg.supcon else {}),
            "train_acc": sums["correct"] / len(train), "val_loss": val_loss, "val_acc": val_acc, "val_macro_f1": val_f1,
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        append_row(cfg.out, row)
        state = _state(model, opt, epoch, step, best, gen, spec, train.class_names, ema)
        if cfg.select == "last" or _score(row, by_f1) > _score(best, by_f1):
            best = {"val_acc": val_acc, "val_loss": val_loss, "val_macro_f1": val_f1, "epoch": epoch + 1}
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
        metrics = evaluate(model, val, input_spec, train.class_names)
        (cfg.out / "metrics.json").write_text(json.dumps(metrics.to_dict() | {"best_epoch": best["epoch"]}, indent=1))
        plot_confusion(metrics.confusion, train.class_names, cfg.out / "confusion_val.png", "validation")
        scores |= {"val_accuracy": metrics.accuracy, "val_mcc": metrics.mcc, "val_macro_f1": metrics.macro_f1,
                   "best_epoch": best["epoch"]}
    # ---- unknown detector: class Gaussians of the training images' features, threshold from the validation part
    model = fit_detector(model, train.class_names, train, val, input_spec, cfg.false_unknown_rate)
    model_dir = cfg.out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    manifest = export_checkpoint(
        model, model_dir, class_names=train.class_names,
        model_name=cfg.model_name or (f"kd-{cfg.arch}" if cfg.teacher else cfg.arch), model_version=cfg.model_version,
        input_spec=input_spec, metrics=scores | (cv_scores(cfg.chosen_by) if cfg.chosen_by else {}),
        data_fingerprint=data_fp, teacher=teacher_name, recipe=recipe_of(cfg), notes="; ".join(notes),
    )
    return FitResult(cfg.out, best["epoch"], metrics, manifest, time.perf_counter() - t_start)
