"""`trainer` command line: summary, fit, cv, export, evaluate, detector, openset, boxes, boxes-cv, publish,
reproduce, locate.

The options of fit, cv, detector, openset, boxes, boxes-cv, reproduce and locate are generated from their configs
(`TrainConfig`, `CVConfig`, `DetectorConfig`, `OpenSetConfig`, `BoxesConfig`, `BoxesCVConfig`, `ReproduceConfig`,
`LocateConfig`) by
trainer/options.py: adding a field adds its flag.
Commands import what they run when they run, so `trainer publish` needs only stripnet and schemas.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from schemas.checkpoint import InputSpec
from stripnet.allocator import keep_freed_memory
from stripnet.architectures import ARCHITECTURES
from stripnet.cam import LocateConfig
from trainer.boxes import BoxesConfig, BoxesCVConfig
from trainer.cv import CVConfig
from trainer.detector import DetectorConfig
from trainer.openset import OpenSetConfig
from trainer.options import HelpFormatter, add_options, from_args
from trainer.reproduce import ReproduceConfig
from trainer.train import TrainConfig

PARTS = ("train", "val", "test")  # the parts of a split.json
TRAINING_EXTRAS = ("tqdm", "matplotlib", "torchmetrics", "pycocotools", "torchvision")  # pyproject's `train` extra: not in the runtime image


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


def cmd_fit(args: argparse.Namespace) -> int:
    from trainer.train import fit

    result = fit(from_args(TrainConfig, args))
    scores = f"val accuracy {result.val.accuracy:.4f}, MCC {result.val.mcc:.4f}" if result.val else "no validation part"
    print(f"epoch {result.best_epoch}: {scores}; fused checkpoint {result.out / 'model'} ({result.seconds:.0f} s)")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from trainer.cv import cross_validate

    recipe = from_args(TrainConfig, args)
    teacher = (replace(recipe, arch="repvgg-a0", epochs=args.teacher_epochs, bf16=True, label_smoothing=0.0,
                       ema_decay=None, jitter=False, model_name="repvgg-a0-teacher") if args.per_fold_teacher else None)
    doc = cross_validate(from_args(CVConfig, args, recipe=recipe, teacher=teacher))
    print((Path(args.out) / "cv.md").read_text())
    return 0 if doc["n"] else 1


def cmd_export(args: argparse.Namespace) -> int:
    from schemas.checkpoint import ArchitectureSpec
    from stripnet.checkpoint import export_checkpoint
    from stripnet.network import build_model
    from trainer.state import load_state

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


def _model_and_data(args: argparse.Namespace):
    """`--model` (or 'default'), and `--data`, or its `--part` of `--split-file`, at the model's input size."""
    from stripnet.bundled import resolve_model_dir
    from stripnet.checkpoint import load_checkpoint
    from trainer.data import load_image_folder, load_split

    model, manifest = load_checkpoint(resolve_model_dir(args.model))
    data = load_image_folder(args.data, manifest.input.size, color=manifest.input.color)
    if args.split_file:
        data = data.subset(load_split(Path(args.split_file), data)[PARTS.index(args.part)])
    return model, manifest, data


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from trainer.evaluate import evaluate, measure_latency, predict_logits, predictions_doc
    from trainer.figures import plot_confusion

    from trainer.detector import unknown_report

    model, manifest, data = _model_and_data(args)
    doc: dict = {"model": f"{manifest.model_name} {manifest.model_version}"}
    if model.ood is not None:
        doc["unknown"] = unknown_report(model, data, manifest.input)
    foreign = sorted(set(data.class_names) - set(manifest.class_names))
    if foreign and "unknown" in doc:  # a new camera's or product's images: the unknown rate is the report
        return _print_unknown(doc, foreign, args.json)
    metrics = evaluate(model, data, manifest.input, manifest.class_names)
    doc |= metrics.to_dict()
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
        if "unknown" in doc:
            _print_unknown(doc, [], False)
    return 0


def _print_unknown(doc: dict, foreign: list[str], as_json: bool) -> int:
    if as_json:
        _print_json(doc)
        return 0
    u = doc["unknown"]
    if foreign:
        print(f"{doc['model']}: the folder has classes the model does not know ({', '.join(foreign)}); unknown rate only")
    print(f"unknown: {u['unknown_rate']:.1%} of {u['images']} images above threshold {u['threshold']:.3f} "
          f"(calibrated for {u['calibrated_rate']:.0%} of held-in images); per folder: "
          + ", ".join(f"{name} {rate:.1%}" for name, rate in u["per_class"].items()))
    return 0


def cmd_detector(args: argparse.Namespace) -> int:
    from trainer.detector import refit_checkpoint

    cfg = from_args(DetectorConfig, args)
    spec = refit_checkpoint(cfg)
    corr = f" and the channel correlations of blocks {list(spec.corr_layers)}" if spec.corr_layers else ""
    print(f"{cfg.model}: {spec.method} unknown detector on blocks {list(spec.layers)}{corr}"
          f"{', standardized per predicted class' if spec.per_class else ''}, threshold "
          f"{spec.threshold:.4f} ({spec.false_unknown_rate:.0%} of {spec.calibration_images} held-in images, "
          f"calibrated on {spec.calibrated_on}; fitted on {spec.fitted_images})")
    return 0


def cmd_openset(args: argparse.Namespace) -> int:
    from trainer.openset import open_set

    open_set(from_args(OpenSetConfig, args, recipe=from_args(TrainConfig, args)))
    print((Path(args.out) / "openset.md").read_text())
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from trainer.publish import publish

    print(f"published {publish(Path(args.checkpoint_dir), Path(args.model_dir))}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from trainer.reproduce import reproduce

    print(reproduce(from_args(ReproduceConfig, args)).read_text())
    return 0


def cmd_boxes(args: argparse.Namespace) -> int:
    from trainer.boxes import fit_checkpoint

    cfg = from_args(BoxesConfig, args)
    spec = fit_checkpoint(cfg)
    print(f"localization head on blocks {list(spec.layers)} ({spec.hidden} channels), trained on "
          f"{spec.fitted_images} annotated images, written into {cfg.model}")
    return 0


def cmd_boxes_cv(args: argparse.Namespace) -> int:
    from trainer.boxes import cross_validate_boxes

    cfg = from_args(BoxesCVConfig, args)
    cross_validate_boxes(cfg)
    print((Path(cfg.out) / "boxes-cv.md").read_text())
    return 0


def cmd_locate(args: argparse.Namespace) -> int:
    from trainer.locate import format_table, pick_examples, run_locate, write_examples

    model, manifest, data = _model_and_data(args)
    config = from_args(LocateConfig, args)
    report, items, found = run_locate(model, manifest, data, Path(args.boxes), config)
    if args.examples:
        chosen = pick_examples(data, items, args.examples_per_class)
        write_examples(model, manifest, data, items, found, chosen, Path(args.examples), config)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_table(report))
    return 0


def _add_model_and_data(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, or 'default' for the bundled model")
    p.add_argument("--data", required=True, help="image folder: one sub-folder per class")
    p.add_argument("--split-file", help=f"{what} one part of a saved split.json")
    p.add_argument("--part", default="val", choices=PARTS, help="the part of --split-file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="Train, distill, fuse and publish KD-EG-RepVGG models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("summary", "parameters, MACs and per-block rows (Table 1)", cmd_summary)
    p.add_argument("--arch", default="eg-repvgg", choices=tuple(ARCHITECTURES))
    p.add_argument("--fused", action="store_true", help="show the re-parameterized (inference) network")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--size", type=int, default=200, help="input side in pixels")
    p.add_argument("--json", action="store_true")

    p = command("fit", "train a teacher or a student (distilled with --teacher)", cmd_fit)
    add_options(p, TrainConfig)

    p = command("cv", "stratified K-fold cross-validation: every image predicted by a model that never saw it",
                cmd_cv)
    add_options(p, CVConfig, exclude={"teacher"})
    p.add_argument("--teacher", dest="per_fold_teacher", action="store_true",
                   help="train a RepVGG-A0 teacher per fold, on that fold's training part only, and distill from it")
    p.add_argument("--teacher-epochs", type=int, default=100, help="epochs of each per-fold teacher")

    p = command("export", "fuse a training state (best.pt/last.pt) into a checkpoint directory", cmd_export)
    p.add_argument("state", help="best.pt or last.pt of a run")
    p.add_argument("--out", required=True, help="the checkpoint directory to write (must not exist)")
    p.add_argument("--size", type=int, default=200, help="input side in pixels the model was trained at")
    p.add_argument("--color", default="gray", choices=("gray", "rgb"), help="the colour the run trained on")
    p.add_argument("--model-name", help="the manifest's model_name (unset: the architecture's name)")
    p.add_argument("--model-version", help="the manifest's model_version (unset: a UTC stamp)")

    p = command("evaluate", "accuracy, MCC, macro-F1, per-class report and confusion matrix", cmd_evaluate)
    _add_model_and_data(p, "evaluate")
    p.add_argument("--latency", action="store_true", help="also measure per-image latency on this machine")
    p.add_argument("--plot", help="write the confusion matrix as a PNG")
    p.add_argument("--predictions", help="write every image's class probabilities as JSON")
    p.add_argument("--json", action="store_true")

    p = command("detector", "fit a checkpoint's unknown detector on its training images and rewrite it in place",
                cmd_detector)
    add_options(p, DetectorConfig)

    p = command("openset", "leave-one-class-out evaluation of the unknown detector (resumable)", cmd_openset)
    add_options(p, OpenSetConfig)

    p = command("boxes", "train a checkpoint's localization head on Pascal VOC boxes (the network stays frozen) "
                         "and rewrite it in place", cmd_boxes)
    add_options(p, BoxesConfig)

    p = command("boxes-cv", "a localization head per fold of a `trainer cv` run, scored on the fold it never saw "
                            "(resumable)", cmd_boxes_cv)
    add_options(p, BoxesCVConfig)

    p = command("publish", "copy a fused checkpoint into a watched model directory, atomically", cmd_publish)
    p.add_argument("checkpoint_dir", help="fused checkpoint directory (manifest.json + weights)")
    p.add_argument("--model-dir", required=True, help="directory the inspector watches")

    p = command("reproduce", "the paper's protocol: teacher, EG-RepVGG, KD-EG-RepVGG, report", cmd_reproduce)
    add_options(p, ReproduceConfig)

    p = command("locate", "boxes (the localization head's, else the CAM's) scored against Pascal VOC boxes: mAP, "
                          "pointing game, IoU, recall", cmd_locate)
    _add_model_and_data(p, "score")
    p.add_argument("--boxes", required=True, help="folder of Pascal VOC XML files named after the images")
    add_options(p, LocateConfig)
    p.add_argument("--examples", help="write example PNGs (image, heat map, boxes) into this folder")
    p.add_argument("--examples-per-class", type=int, default=1)
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"trainer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name not in TRAINING_EXTRAS:
            raise
        print(f"trainer {args.command}: error: needs the training extras, pip install 'strip-inspector[train]' "
              f"({err})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
