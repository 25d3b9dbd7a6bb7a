"""`trainer reproduce`: the paper's protocol, by chaining `fit` — teacher, EG-RepVGG, KD-EG-RepVGG — then a report.

Every stage is a run directory under `out`; a finished stage (its model/manifest.json exists) is
skipped and an interrupted one resumes, so the command can be re-run after any stop.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from stripnet.checkpoint import load_checkpoint
from trainer.data import load_image_folder, load_split
from trainer.evaluate import measure_latency
from trainer.figures import plot_confusion, plot_feature_maps, plot_grad_cam, plot_validation_curves
from trainer.options import Opt, parse_split
from trainer.runlog import read_rows
from trainer.train import TrainConfig, fit

PAPER_ROWS = {  # Table 3 of the paper: accuracy, MCC (test set), time per image on an RTX 3060
    "repvgg-a0": {"accuracy": 0.9883, "mcc": 0.9791, "ms": 5.1, "params_m": 7.04, "gflops": 1.36},
    "eg-repvgg": {"accuracy": 0.9722, "mcc": 0.9639, "ms": 2.4, "params_m": 0.14, "gflops": 0.03},
    "kd-eg-repvgg": {"accuracy": 0.9944, "mcc": 0.9902, "ms": 2.4, "params_m": 0.14, "gflops": 0.03},
}


@dataclass(frozen=True)
class ReproduceConfig:
    data: Annotated[Path, "image folder: one sub-folder per class"]
    out: Annotated[Path, "directory of the runs and the report (a re-run skips finished stages)"]
    teacher_epochs: int = 100
    student_epochs: int = 100
    seeds: Annotated[tuple[int, ...], "one EG-RepVGG and one KD-EG-RepVGG run per seed"] = (0, 1, 2)
    split: Annotated[tuple[float, ...], Opt("train:val; 8:1 is NEU-CLS's 1440/180", parse=parse_split)] = (8 / 9, 1 / 9)
    limit_per_class: Annotated[int | None, "use only the first N images of each class"] = None
    size: Annotated[int, "input side in pixels"] = 200
    teacher_bf16: Annotated[bool, "train the teacher under bf16 autocast"] = True
    progress: Annotated[bool, "progress bars rather than plain per-epoch lines"] = True


def stage_configs(cfg: ReproduceConfig) -> dict[str, TrainConfig]:
    """Run name → its fit config. Students share the teacher's split file and the cached teacher logits."""
    # The paper's recipe: D4 augmentation only, no jitter, label smoothing or EMA, fp32 students.
    common = dict(data=cfg.data, limit_per_class=cfg.limit_per_class, progress=cfg.progress, split=cfg.split,
                  size=cfg.size, color="gray", jitter=False, label_smoothing=0.0, ema_decay=None)
    teacher_dir = cfg.out / "teacher"
    stages = {"teacher": TrainConfig(out=teacher_dir, arch="repvgg-a0", epochs=cfg.teacher_epochs,
                                     bf16=cfg.teacher_bf16, model_name="repvgg-a0-teacher", **common)}
    for seed in cfg.seeds:
        student = dict(common, arch="eg-repvgg", epochs=cfg.student_epochs, seed=seed, bf16=False,
                       split_file=teacher_dir / "split.json")
        stages[f"eg-s{seed}"] = TrainConfig(out=cfg.out / f"eg-s{seed}", model_name="eg-repvgg", **student)
        stages[f"kd-s{seed}"] = TrainConfig(
            out=cfg.out / f"kd-s{seed}", model_name="kd-eg-repvgg", teacher=teacher_dir / "model",
            teacher_cache_dir=cfg.out / "cache", **student,
        )
    return stages


def is_done(run: Path) -> bool:
    return (run / "model" / "manifest.json").is_file()


def reproduce(cfg: ReproduceConfig) -> Path:
    for name, stage in stage_configs(cfg).items():
        if not is_done(stage.out):
            fit(stage)
    return write_report(cfg.out, cfg.data, [f"eg-s{s}" for s in cfg.seeds], [f"kd-s{s}" for s in cfg.seeds])


def _run_summary(run: Path) -> dict:
    model, manifest = load_checkpoint(run / "model")
    log = read_rows(run)
    return {
        "run": run.name, "accuracy": manifest.metrics["val_accuracy"], "mcc": manifest.metrics["val_mcc"],
        "macro_f1": manifest.metrics["val_macro_f1"], "best_epoch": int(manifest.metrics["best_epoch"]),
        "epochs": len(log), "train_minutes": sum(r["seconds"] for r in log) / 60,
        "params": manifest.parameters, "macs": manifest.macs,
        "ms_per_image": measure_latency(model, manifest.input, batch_size=1).ms_per_image,
    }


def _mean_std(rows: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_figures(out: Path, data: Path, selected: str, runs: list[str]) -> None:
    """Validation curves of every run; confusion matrix, Grad-CAM per class and feature maps of the selected one."""
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    logs = {run: read_rows(out / run) for run in runs}
    plot_validation_curves(logs, figures / "validation_curves.png")
    model, manifest = load_checkpoint(out / selected / "model")
    metrics = json.loads((out / selected / "metrics.json").read_text())
    plot_confusion(metrics["confusion"], manifest.class_names, figures / "confusion.png", f"{selected}, validation")
    limit = json.loads((out / selected / "config.json").read_text())["limit_per_class"]
    images = load_image_folder(data, manifest.input.size, limit)
    val = images.subset(load_split(out / selected / "split.json", images)[1])
    plot_grad_cam(model, manifest.input, manifest.class_names, val, figures / "grad_cam.png")
    plot_feature_maps(model, manifest.input, val, 0, figures / "feature_maps.png")


def write_report(out: Path, data: Path, eg_runs: list[str], kd_runs: list[str]) -> Path:
    teacher = _run_summary(out / "teacher")
    groups = {"repvgg-a0": [teacher], "eg-repvgg": [_run_summary(out / r) for r in eg_runs if is_done(out / r)],
              "kd-eg-repvgg": [_run_summary(out / r) for r in kd_runs if is_done(out / r)]}
    lines = [
        "| model | runs | val accuracy (ours) | val MCC (ours) | paper accuracy | paper MCC | ms/image (ours, CPU b=1) "
        "| paper ms (RTX 3060) | params (fused) | MACs | train min/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in groups.items():
        if not rows:
            continue
        (acc, acc_sd), (mcc, mcc_sd) = _mean_std(rows, "accuracy"), _mean_std(rows, "mcc")
        paper = PAPER_ROWS[name]
        lines.append(
            f"| {name} | {len(rows)} | {100 * acc:.2f} ± {100 * acc_sd:.2f} % | {100 * mcc:.2f} ± {100 * mcc_sd:.2f} % "
            f"| {100 * paper['accuracy']:.2f} % | {100 * paper['mcc']:.2f} % | {_mean_std(rows, 'ms_per_image')[0]:.2f} "
            f"| {paper['ms']} | {rows[0]['params'] / 1e6:.3f} M | {rows[0]['macs'] / 1e6:.1f} M "
            f"| {_mean_std(rows, 'train_minutes')[0]:.1f} |"
        )
    selected = max(groups["kd-eg-repvgg"] or groups["eg-repvgg"], key=lambda r: (r["accuracy"], r["mcc"]))
    write_figures(out, data, selected["run"], [r["run"] for rows in groups.values() for r in rows])
    (out / "report.json").write_text(json.dumps(groups | {"selected": selected["run"]}, indent=1))
    report = out / "report.md"
    report.write_text("# Table 3, reproduced (validation split; the external test set is held elsewhere)\n\n"
                      + "\n".join(lines) + f"\n\nSelected model: {selected['run']}/model\n\nPer run:\n\n"
                      + "\n".join(f"- {r['run']}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                                 for k, v in r.items() if k != "run")
                                  for rows in groups.values() for r in rows) + "\n")
    return report
