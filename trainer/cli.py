"""`trainer` command line: summary, fit, export, evaluate, publish, locate, reproduce."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from schemas.checkpoint import InputSpec


def parse_split(text: str) -> tuple[float, ...]:
    """'8:1:1' or '0.8,0.1,0.1' → fractions summing to 1 (two parts = train/val, one = train on everything)."""
    parts = [float(p) for p in text.replace(",", ":").split(":")]
    if len(parts) not in (1, 2, 3) or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"split needs 1 to 3 non-negative parts, got {text!r}")
    return tuple(p / sum(parts) for p in parts)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_summary(args: argparse.Namespace) -> int:
    from stripnet.architectures import get_spec
    from stripnet.network import build_model, reparameterize
    from stripnet.profile import count_macs, count_parameters, profile_rows

    spec = get_spec(args.arch)
    model = build_model(spec, args.classes)
    fused = reparameterize(model)
    shown = fused if args.fused else model
    doc = {
        "arch": spec.name,
        "fused": args.fused,
        "train_parameters": count_parameters(model),
        "inference_parameters": count_parameters(fused),
        "macs": count_macs(fused, args.size),
        "blocks": [asdict(r) for r in profile_rows(shown, args.size)],
    }
    if args.json:
        _print_json(doc)
        return 0
    print(f"{spec.name} ({'fused' if args.fused else 'training form'}), input {args.size}×{args.size}×3")
    print(f"{'layer':<8} {'output':>10} {'channels':>9} {'params':>10} {'MACs':>12}")
    for r in doc["blocks"]:
        size = "×".join(map(str, r["output_size"]))
        print(f"{r['name']:<8} {size:>10} {r['out_channels']:>9} {r['parameters']:>10,} {r['macs']:>12,}")
    print(f"train parameters {doc['train_parameters']:,}; inference parameters {doc['inference_parameters']:,}; "
          f"MACs {doc['macs'] / 1e6:.2f} M")
    return 0


def _train_config(args: argparse.Namespace):
    from trainer.distill import KDConfig
    from trainer.train import TrainConfig

    return TrainConfig(
        data=Path(args.data), out=Path(args.out), arch=args.arch, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, warmup_epochs=args.warmup_epochs, seed=args.seed, split=args.split, split_seed=args.split_seed,
        split_file=Path(args.split_file) if args.split_file else None, size=args.size, color=args.color,
        balance=args.balance,
        teacher=Path(args.teacher) if getattr(args, "teacher", None) else None,
        kd=KDConfig(temperature=args.temperature, alpha=args.alpha, t_squared=args.t_squared),
        teacher_cache_dir=Path(args.teacher_cache_dir) if args.teacher_cache_dir else None,
        limit_per_class=args.limit_per_class, threads=args.threads, bf16=args.bf16, model_name=args.model_name,
        model_version=args.model_version, progress=not args.no_progress, select=args.select,
        label_smoothing=args.label_smoothing, ema_decay=args.ema, jitter=args.jitter,
        chosen_by=Path(args.chosen_by) if getattr(args, "chosen_by", None) else None,
    )


def cmd_fit(args: argparse.Namespace) -> int:
    from trainer.train import fit

    result = fit(_train_config(args))
    scores = f"val accuracy {result.val.accuracy:.4f}, MCC {result.val.mcc:.4f}" if result.val else "no validation part"
    print(f"epoch {result.best_epoch}: {scores}; fused checkpoint {result.out / 'model'} ({result.seconds:.0f} s)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from schemas.checkpoint import ArchitectureSpec
    from stripnet.checkpoint import export_checkpoint
    from trainer.state import load_state
    from stripnet.network import build_model

    state = load_state(Path(args.state))
    spec = ArchitectureSpec.model_validate(state["arch"])
    model = build_model(spec, len(state["class_names"]))
    model.load_state_dict(state["model"])
    manifest = export_checkpoint(
        model, args.out, class_names=tuple(state["class_names"]), model_name=args.model_name or spec.name,
        model_version=args.model_version, input_spec=InputSpec(size=args.size, color=args.color),
    )
    print(f"wrote {args.out} ({manifest.model_name} {manifest.model_version}, sha256 {manifest.weights_sha256[:12]}…)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from stripnet.bundled import resolve_model_dir
    from stripnet.checkpoint import load_checkpoint
    from trainer.data import load_image_folder, load_split
    from trainer.evaluate import evaluate, measure_latency, plot_confusion, predict_logits, predictions_doc

    model, manifest = load_checkpoint(resolve_model_dir(args.model))
    data = load_image_folder(args.data, manifest.input.size, color=manifest.input.color)
    if args.split_file:
        parts = load_split(Path(args.split_file), data)
        data = data.subset(parts[["train", "val", "test"].index(args.part)])
    metrics = evaluate(model, data, manifest.input, manifest.class_names)
    doc = metrics.to_dict() | {"model": f"{manifest.model_name} {manifest.model_version}"}
    if args.latency:
        doc["latency"] = asdict(measure_latency(model, manifest.input))
    if args.plot:
        plot_confusion(metrics.confusion, manifest.class_names, Path(args.plot), f"{manifest.model_name}")
    if args.predictions:
        probs = torch.softmax(predict_logits(model, data, manifest.input), dim=1)
        Path(args.predictions).write_text(json.dumps(predictions_doc(data, probs, manifest.class_names), indent=0))
    if args.json:
        _print_json(doc)
    else:
        print(f"{doc['model']} on {metrics.n} images: accuracy {metrics.accuracy:.4f}, MCC {metrics.mcc:.4f}, "
              f"macro-F1 {metrics.macro_f1:.4f}")
        for name, rep in metrics.per_class.items():
            print(f"  {name:<16} precision {rep.precision:.3f} recall {rep.recall:.3f} f1 {rep.f1:.3f} n={rep.support}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from trainer.publish import publish

    print(f"published {publish(Path(args.checkpoint_dir), Path(args.model_dir))}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from trainer.reproduce import ReproduceConfig, reproduce

    cfg = ReproduceConfig(
        data=Path(args.data), out=Path(args.out), teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs, seeds=tuple(args.seeds), split=args.split,
        limit_per_class=args.limit_per_class, size=args.size, progress=not args.no_progress,
    )
    report = reproduce(cfg)
    print(report.read_text())
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from trainer.cv import CVConfig, cross_validate

    recipe = _train_config(args)
    teacher = (replace(recipe, arch="repvgg-a0", epochs=args.teacher_epochs, bf16=True, label_smoothing=0.0,
                       ema_decay=None, jitter=False, model_name="repvgg-a0-teacher") if args.per_fold_teacher else None)
    cfg = CVConfig(data=Path(args.data), out=Path(args.out), recipe=recipe, teacher=teacher, folds=args.folds,
                   fold_seed=args.fold_seed, jobs=args.jobs, threads=args.threads or 1,
                   limit_per_class=args.limit_per_class)
    doc = cross_validate(cfg)
    print((Path(args.out) / "cv.md").read_text())
    return 0 if doc["n"] else 1


def cmd_locate(args: argparse.Namespace) -> int:
    from stripnet.checkpoint import load_checkpoint
    from trainer.data import load_image_folder, load_split
    from stripnet.cam import LocateConfig
    from trainer.locate import format_table, pick_examples, run_locate, write_examples
    from stripnet.bundled import resolve_model_dir

    model, manifest = load_checkpoint(resolve_model_dir(args.model))
    data = load_image_folder(args.data, manifest.input.size, color=manifest.input.color)
    if args.split_file:
        data = data.subset(load_split(Path(args.split_file), data)[["train", "val", "test"].index(args.part)])
    config = LocateConfig(threshold=args.threshold, score=args.score, min_area=args.min_area, step=args.step)
    report, items, preds = run_locate(model, manifest, data, Path(args.boxes), config)
    if args.examples:
        chosen = pick_examples(data, items, args.examples_per_class)
        write_examples(model, manifest, data, items, preds, chosen, Path(args.examples))
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_table(report))
    return 0


def _add_fit_args(p: argparse.ArgumentParser, teacher_dir: bool = True) -> None:
    p.add_argument("--data", required=True, help="image folder: one sub-folder per class")
    p.add_argument("--out", required=True, help="run directory (resumes if it holds last.pt)")
    p.add_argument("--arch", default="eg-repvgg", choices=["eg-repvgg", "repvgg-a0"])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", type=parse_split, default=(0.8, 0.1, 0.1), help="train:val[:test], default 8:1:1")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--split-file", help="reuse a split.json from another run")
    p.add_argument("--size", type=int, help="input side in pixels (default: the images' own size)")
    p.add_argument("--color", default="auto", choices=["auto", "gray", "rgb"],
                   help="model input: rgb (in that order) when any image's channels differ, else gray (auto)")
    p.add_argument("--balance", default="auto", choices=["auto", "none", "sampling", "loss"],
                   help="imbalanced classes: class-balanced sampling (auto: when largest/smallest class > 1.5), "
                        "per-class loss weights, or none")
    if teacher_dir:
        p.add_argument("--teacher", help="teacher checkpoint directory: turns on distillation")
    p.add_argument("--temperature", type=float, default=7.0)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--t-squared", action="store_true", help="scale the KD term by T² (Hinton); off in the paper")
    p.add_argument("--teacher-cache-dir", help="share cached teacher logits between runs")
    p.add_argument("--limit-per-class", type=int, help="use only the first N images of each class")
    p.add_argument("--threads", type=int)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU (a compute cut; see docs/results.md)")
    p.add_argument("--model-name")
    p.add_argument("--model-version")
    p.add_argument("--no-progress", action="store_true", help="plain per-epoch lines instead of a progress bar")
    p.add_argument("--select", default="best", choices=["best", "last"],
                   help="checkpoint the best epoch on validation, or the last one (no validation pick)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--ema", type=float, help="keep an exponential moving average of the weights with this decay")
    p.add_argument("--jitter", action="store_true", help="camera jitter (exposure, blur, shift, scale) on top of D4")
    p.add_argument("--chosen-by", help="the `trainer cv` run that chose this recipe: its figures go into the manifest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="Train, distill, fuse and publish KD-EG-RepVGG models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="parameters, MACs and per-block rows (Table 1)")
    p.add_argument("--arch", default="eg-repvgg", choices=["eg-repvgg", "repvgg-a0"])
    p.add_argument("--fused", action="store_true", help="show the re-parameterized (inference) network")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("fit", help="train a teacher or a student (distilled with --teacher)")
    _add_fit_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("cv", help="stratified K-fold cross-validation: every image predicted by a model that never saw it")
    _add_fit_args(p, teacher_dir=False)
    p.add_argument("--teacher", dest="per_fold_teacher", action="store_true",
                   help="train a RepVGG-A0 teacher per fold, on that fold's training part only, and distill from it")
    p.add_argument("--teacher-epochs", type=int, default=100)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fold-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="folds trained at the same time, one process each")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("export", help="fuse a training state (best.pt/last.pt) into a checkpoint directory")
    p.add_argument("state", help="best.pt or last.pt of a run")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--color", default="gray", choices=["gray", "rgb"], help="the colour the run trained on")
    p.add_argument("--model-name")
    p.add_argument("--model-version")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="accuracy, MCC, macro-F1, per-class report and confusion matrix")
    p.add_argument("--model", required=True, help="checkpoint directory, or 'default' for the bundled model")
    p.add_argument("--data", required=True)
    p.add_argument("--split-file", help="evaluate one part of a saved split")
    p.add_argument("--part", default="val", choices=["train", "val", "test"])
    p.add_argument("--latency", action="store_true", help="also measure per-image latency on this machine")
    p.add_argument("--plot", help="write the confusion matrix as a PNG")
    p.add_argument("--predictions", help="write every image's class probabilities as JSON")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("publish", help="copy a fused checkpoint into a watched model directory, atomically")
    p.add_argument("checkpoint_dir", help="fused checkpoint directory (manifest.json + weights)")
    p.add_argument("--model-dir", required=True, help="directory the inspector watches")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("reproduce", help="the paper's protocol: teacher, EG-RepVGG, KD-EG-RepVGG, report")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--teacher-epochs", type=int, default=100)
    p.add_argument("--student-epochs", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--split", type=parse_split, default=(8 / 9, 1 / 9), help="default 8:1 (1440/180 of NEU's 1620)")
    p.add_argument("--limit-per-class", type=int)
    p.add_argument("--size", type=int, default=200, help="input side in pixels")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("locate", help="CAM boxes scored against Pascal VOC boxes: pointing game, IoU, recall")
    p.add_argument("--model", required=True, help="checkpoint directory, or 'default' for the bundled model")
    p.add_argument("--data", required=True, help="image folder: one sub-folder per class")
    p.add_argument("--boxes", required=True, help="folder of Pascal VOC XML files named after the images")
    p.add_argument("--split-file", help="score one part of a saved split")
    p.add_argument("--part", default="val", choices=["train", "val", "test"])
    p.add_argument("--threshold", type=float, default=0.5, help="box threshold, fraction of the map maximum")
    p.add_argument("--score", default="mean", choices=["mean", "max"], help="box score: CAM mean or max inside")
    p.add_argument("--min-area", type=float, default=0.01, help="drop components below this fraction of the frame")
    p.add_argument("--step", type=int, default=4, help="evaluate the map every STEP pixels (boxes snap to it)")
    p.add_argument("--examples", help="write example PNGs (image, heat map, boxes) into this folder")
    p.add_argument("--examples-per-class", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_locate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"trainer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
