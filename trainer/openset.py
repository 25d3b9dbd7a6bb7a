"""`trainer openset`: leave-one-class-out evaluation of the unknown detector, with no outside data.

For each class c of the folder, a model is trained on the other classes only (split `out/without-<c>/`,
its training view `data/` links the other class folders) and the held-out class plays the unknown: a
class the model never saw, as a new defect type on a real line would be. The detector is fitted on the
split's own training images and its threshold calibrated on the split's validation part, exactly as
`trainer fit` does for every model; the known classes' test part and every image of the held-out class
are then scored. A split with a complete `outputs.safetensors` is done and skipped; an interrupted one
resumes from its run's `last.pt`.

The outputs file keeps the logits, every block's channel statistics and the correlation blocks' channel
correlations of every image, so the report compares several scores (stripnet.ood's Mahalanobis distance on
each block, on the last block's pooled features and on all blocks together, and energy, kNN and
max-softmax) without running a network again: `openset.json`, `openset.md` and the score distributions
`scores.png`. An outputs file written before the correlation parts is written again from the split's
finished run (its training resumes at the end and only exports).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from schemas.checkpoint import InputSpec
from stripnet.checkpoint import load_checkpoint
from stripnet.network import RepNet
from stripnet.ood import calibrate, channel_correlations, channel_stats, fit_correlation_knn, fit_head, fit_knn
from stripnet.preprocess import normalize
from trainer.data import class_folders, load_image_folder
from trainer.detector import (CORR_BLOCKS, CORR_DIMS, DEFAULT_METHOD, DEFAULT_SPREAD, KNN_FROM, MAHALANOBIS_LAYER,
                              NEIGHBOURS, Fitting, Method, default_corr_layers, detector_layers, fit_method,
                              score_all)
from trainer.jobs import in_processes
from trainer.runlog import read_rows
from trainer.train import TrainConfig, fit

OUTPUTS = "outputs.safetensors"
PARTS = ("train", "val", "test", "unknown")  # `part` codes in the features file


def _default_recipe() -> TrainConfig:
    # The default recipe, as `trainer fit` trains, on one thread (see docs/openset.md for the cost).
    return TrainConfig(data=Path("."), out=Path("."), threads=1, progress=False)


@dataclass(frozen=True)
class OpenSetConfig:
    data: Annotated[Path, "image folder: one sub-folder per class"]
    out: Annotated[Path, "directory of the splits and the report (a re-run skips finished splits)"]
    recipe: TrainConfig = field(default_factory=_default_recipe)  # data, out and split are set per split
    false_unknown_rate: Annotated[float, "threshold calibration: the share of held-in images allowed to be unknown"] = 0.01
    limit_per_class: Annotated[int | None, "use only the first N images of each class"] = None
    jobs: Annotated[int, "splits trained at the same time, one process each"] = 1


def split_dir(out: Path, held_out: str) -> Path:
    return out / f"without-{held_out}"


def training_view(root: Path, held_out: str, view: Path) -> Path:
    """A folder of links to every class folder of `root` but `held_out`: what the split's model trains on."""
    view.mkdir(parents=True, exist_ok=True)
    for folder in class_folders(root):
        link = view / folder.name
        if folder.name != held_out and not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)
    return view


@torch.inference_mode()
def block_outputs(model: RepNet, images: torch.Tensor, spec: InputSpec, batch_size: int = 128
                  ) -> tuple[list[torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """Every block's (N, 2C) channel statistics, the correlation blocks' (`default_corr_layers`) channel
    correlations and the (N, classes) logits of `images`, one pass per batch."""
    model.eval()
    stats: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    corr: dict[int, list[torch.Tensor]] = {b: [] for b in default_corr_layers(len(model.blocks))}
    logits = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size], spec)
        for b, block in enumerate(model.blocks):
            x = block(x)
            stats[b].append(channel_stats(x))
            if b in corr:
                corr[b].append(channel_correlations(x))
        logits.append(model.head(x))
    return [torch.cat(s) for s in stats], {b: torch.cat(c) for b, c in corr.items()}, torch.cat(logits)


def _complete(path: Path) -> bool:
    """A split's outputs file that exists and holds the correlation features (later than the first outputs)."""
    if not path.exists():
        return False
    with safe_open(path, "pt") as f:
        return any(name.startswith("corr_") for name in f.keys())


def run_split(cfg: OpenSetConfig, held_out: str) -> Path:
    """Train without `held_out`, then keep the features and logits of every image of the folder."""
    here = split_dir(cfg.out, held_out)
    done = here / OUTPUTS
    if _complete(done):
        return done
    view = training_view(cfg.data, held_out, here / "data")
    result = fit(replace(cfg.recipe, data=view, out=here / "run", split=(0.8, 0.1, 0.1), split_file=None,
                         limit_per_class=cfg.limit_per_class, teacher=None))
    model, manifest = load_checkpoint(result.out / "model")
    data = load_image_folder(cfg.data, manifest.input.size, cfg.limit_per_class)
    split = json.loads((result.out / "split.json").read_text())
    part = torch.full((len(data),), PARTS.index("unknown"), dtype=torch.long)
    where = {p: i for i, p in enumerate(data.paths)}
    for name in ("train", "val", "test"):
        part[[where[p] for p in split[name]]] = PARTS.index(name)
    stats, corr, logits = block_outputs(model, data.images, manifest.input)
    known = torch.tensor([manifest.class_names.index(n) if n in manifest.class_names else -1
                          for n in data.class_names])
    tmp = done.with_suffix(".tmp")
    save_file({"logits": logits, "labels": known[data.labels], "part": part}
              | {f"stats_{b}": t.contiguous() for b, t in enumerate(stats)}
              | {f"corr_{b}": t.contiguous() for b, t in corr.items()}, tmp,
              metadata={"held_out": held_out, "class_names": json.dumps(manifest.class_names),
                        "epochs": str(cfg.recipe.epochs),
                        "seconds": f"{sum(row['seconds'] for row in read_rows(result.out)):.0f}"})
    tmp.replace(done)
    return done


def open_set(cfg: OpenSetConfig) -> dict:
    classes = [f.name for f in class_folders(cfg.data)]
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    pending = [c for c in classes if not _complete(split_dir(cfg.out, c) / OUTPUTS)]
    print(f"openset: {len(classes)} splits, {len(classes) - len(pending)} done; running {pending} "
          f"({cfg.jobs} at a time; per-epoch logs in {cfg.out}/without-*/run/log.csv)", flush=True)
    for held_out, _ in in_processes(partial(run_split, cfg), pending, cfg.jobs):
        print(f"openset: split without {held_out} done", flush=True)
    return write_report(cfg.out, cfg.false_unknown_rate)


def load_split_outputs(path: Path) -> SplitOutputs:
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    blocks = sum(name.startswith("stats_") for name in tensors)
    return SplitOutputs(held_out=meta["held_out"], class_names=tuple(json.loads(meta["class_names"])),
                        stats=[tensors[f"stats_{b}"] for b in range(blocks)],
                        corr={int(name[5:]): t for name, t in tensors.items() if name.startswith("corr_")},
                        logits=tensors["logits"],
                        labels=tensors["labels"], part=tensors["part"], epochs=int(meta["epochs"]),
                        seconds=float(meta["seconds"]))


@dataclass(frozen=True)
class SplitOutputs:
    held_out: str
    class_names: tuple[str, ...]  # the split model's (known) classes
    stats: list[torch.Tensor]  # per block, (N, 2C): every image's channel means, then standard deviations
    corr: dict[int, torch.Tensor]  # per correlation block, (N, C(C − 1)/2): channel correlations
    logits: torch.Tensor  # (N, known classes)
    labels: torch.Tensor  # (N,) index into class_names, -1 for the held-out class
    part: torch.Tensor  # (N,) index into PARTS
    epochs: int
    seconds: float

    def where(self, name: str) -> torch.Tensor:
        return self.part == PARTS.index(name)

    @property
    def pooled(self) -> torch.Tensor:
        """The last block's channel means: the linear head's input."""
        last = self.stats[-1]
        return last[:, :last.shape[1] // 2]


# -- the scores: higher = more unknown. Each is fitted on the split's training images only. ---------------


def max_softmax(out: SplitOutputs) -> np.ndarray:
    return -torch.softmax(out.logits, dim=1).max(dim=1).values.numpy()


def energy(out: SplitOutputs) -> np.ndarray:
    return -torch.logsumexp(out.logits, dim=1).numpy()


def mahalanobis(out: SplitOutputs, features: torch.Tensor, log_spread: bool = False) -> np.ndarray:
    train = out.where("train")
    head = fit_head(features[train], out.labels[train], len(out.class_names), log_spread=log_spread)
    with torch.no_grad():
        return head(features).numpy()


def knn_distance(out: SplitOutputs, features: torch.Tensor) -> np.ndarray:
    """kNN on the normalized channel means of `features` (N, 2C), kept from the training part."""
    train = out.where("train")
    return score_all(fit_knn(features[train], NEIGHBOURS), features, out.logits, train).numpy()


def correlation_knn(out: SplitOutputs, features: torch.Tensor) -> np.ndarray:
    """A correlation part alone (stripnet.ood.CorrelationKNN) on (N, D) channel correlations."""
    train = out.where("train")
    head = fit_correlation_knn(features[train], NEIGHBOURS, CORR_DIMS)
    return score_all(head, features, out.logits, train).numpy()


def every_block(out: SplitOutputs) -> np.ndarray:
    """Lee et al.'s feature ensemble, unweighted: the sum over blocks of each block's distance, standardized by its
    validation scores."""
    val = out.where("val").numpy()
    total = np.zeros(len(out.part))
    for stats in out.stats:
        score = mahalanobis(out, stats)
        total += (score - score[val].mean()) / score[val].std()
    return total


def served(out: SplitOutputs, method: Method, knn_layers: tuple[int, ...] = (), per_class: bool = True,
           corr_dims: int = CORR_DIMS) -> np.ndarray:
    """The detector `--method method` serves (trainer.detector.fit_method), fitted on the split's training part,
    its standardization on training and validation; each training image scored as `fitted_scores` does.
    `knn_layers` unset: the served blocks; `corr_dims` 0: no correlation parts."""
    chosen = detector_layers(method, len(out.stats), knn_layers=knn_layers, corr_dims=corr_dims)
    features = torch.cat([*(out.stats[b] for b in chosen.stats), *(out.corr[b] for b in chosen.corr)], dim=1)
    train, val = out.where("train"), out.where("val")
    head, _ = fit_method(method, Fitting(features[train], out.logits[train]), out.labels[train],
                         Fitting(features[val], out.logits[val]), len(out.class_names),
                         [out.stats[b].shape[1] for b in chosen.stats], DEFAULT_SPREAD, per_class=per_class,
                         corr_widths=[out.corr[b].shape[1] for b in chosen.corr], corr_dims=corr_dims)
    return score_all(head, features, out.logits, train).numpy()


BLOCK_2_LOG = f"Mahalanobis, block {MAHALANOBIS_LAYER + 1} mean + log std"
KNN = f"kNN (k={NEIGHBOURS}), last block pooled"
WITH_TRAINING = ", calibrated on training + validation"
COMBINED = (f"combined: Mahalanobis block {MAHALANOBIS_LAYER + 1} + kNN on every block from block {KNN_FROM + 1} on "
            f"+ correlation kNN on blocks {KNN_FROM + 1}–{KNN_FROM + CORR_BLOCKS}, each standardized, "
            "the sum per predicted class")
NO_CORR = f"combined without the correlation parts (shipped before){WITH_TRAINING}"
ONE_SCALE = f"combined without the correlation parts, the sum not standardized per class{WITH_TRAINING}"
LAST_ONLY = (f"combined, kNN on the last block only, no correlation parts, the sum not standardized per class "
             f"(shipped first){WITH_TRAINING}")
METHODS = {method: (name, partial(served, method=method))
           for method, name in (("combined", COMBINED), ("mahalanobis", BLOCK_2_LOG), ("knn", KNN))}


def _calibrated(name: str, method: str) -> str:
    return f"{name}{WITH_TRAINING} " + ("(as shipped)" if method == DEFAULT_METHOD else f"(--method {method})")


SHIPPED = _calibrated(METHODS[DEFAULT_METHOD][0], DEFAULT_METHOD)

SCORES = {
    **{_calibrated(name, method): fn for method, (name, fn) in METHODS.items()},
    NO_CORR: partial(served, method="combined", corr_dims=0),
    ONE_SCALE: partial(served, method="combined", per_class=False, corr_dims=0),
    LAST_ONLY: partial(served, method="combined", knn_layers=(-1,), per_class=False, corr_dims=0),
    COMBINED: METHODS["combined"][1],
    BLOCK_2_LOG: METHODS["mahalanobis"][1],
    f"Mahalanobis, block {MAHALANOBIS_LAYER + 1} mean+std": lambda out: mahalanobis(out, out.stats[MAHALANOBIS_LAYER]),
    KNN: METHODS["knn"][1],
    "Mahalanobis, last block pooled (Lee et al.)": lambda out: mahalanobis(out, out.pooled),
    "Mahalanobis, every block, z-summed": every_block,
    "energy": energy,
    "max-softmax (baseline)": max_softmax,
}


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of an unknown image > score of a known one), ties counted half (the Mann–Whitney U)."""
    greater = (unknown[:, None] > known[None, :]).mean()
    return float(greater + 0.5 * (unknown[:, None] == known[None, :]).mean())


def score_split(out: SplitOutputs, score: np.ndarray, rate: float, with_training: bool = False) -> dict[str, float]:
    """AUROC (known test vs unknown), and the rates at the threshold calibrated on the validation part (and the
    training part too, `with_training`: what trainer.detector ships)."""
    held_in = out.where("val") | out.where("train") if with_training else out.where("val")
    known, unknown, val = score[out.where("test")], score[out.where("unknown")], score[held_in]
    threshold = calibrate(val, rate)
    return {"auroc": auroc(known, unknown), "threshold": threshold,
            "unknown_flagged": float((unknown > threshold).mean()),
            "false_unknown_test": float((known > threshold).mean()),
            "known_test": int(len(known)), "unknown_images": int(len(unknown)), "calibration_images": int(len(val))}


def write_report(out_dir: Path, rate: float) -> dict:
    """openset.json, openset.md and scores.png from the splits' outputs. Thresholds are calibrated at `rate` and,
    for the goal's operating point, at 2 %."""
    splits = [load_split_outputs(p) for p in sorted(out_dir.glob(f"without-*/{OUTPUTS}"))]
    if not splits:
        raise ValueError(f"no finished splits under {out_dir}")
    by_score = {fn: {s.held_out: fn(s) for s in splits} for fn in set(SCORES.values())}  # a row per calibration
    scores = {name: by_score[fn] for name, fn in SCORES.items()}
    rates = sorted({rate, 0.02})
    table = {name: {f"{r:g}": {s.held_out: score_split(s, per[s.held_out], r, WITH_TRAINING in name) for s in splits}
                    for r in rates} for name, per in scores.items()}
    per_block = {kind: {b + 1: {s.held_out: score_split(s, fn(s, s.stats[b]), rate)["auroc"] for s in splits}
                        for b in range(len(splits[0].stats))}
                 for kind, fn in (("mahalanobis", mahalanobis), ("knn", knn_distance))}
    per_block["correlation"] = {b + 1: {s.held_out: score_split(s, correlation_knn(s, s.corr[b]), rate)["auroc"]
                                        for s in splits} for b in splits[0].corr}
    doc = {"false_unknown_rate": rate, "rates": rates, "served": SHIPPED, "epochs": splits[0].epochs,
           "seconds": {s.held_out: s.seconds for s in splits},
           "accuracy": {s.held_out: _test_accuracy(s) for s in splits},
           "methods": {name: {r: {"splits": rows, "mean": _means(rows)} for r, rows in by_rate.items()}
                       for name, by_rate in table.items()},
           "per_block_auroc": per_block}
    (out_dir / "openset.json").write_text(json.dumps(doc, indent=1))
    (out_dir / "openset.md").write_text(format_report(doc))
    plot_scores(splits, scores[SHIPPED], table[SHIPPED][f"{rate:g}"], out_dir / "scores.png")
    return doc


def _test_accuracy(out: SplitOutputs) -> float:
    test = out.where("test")
    return float((out.logits[test].argmax(dim=1) == out.labels[test]).float().mean())


def _means(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = ("auroc", "unknown_flagged", "false_unknown_test")
    return {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}


def format_report(doc: dict) -> str:
    rates = [f"{r:g}" for r in doc["rates"]]
    splits = list(doc["accuracy"])
    head = " | ".join(f"flagged / false unknown at {float(r):.0%}" for r in rates)
    lines = [
        f"# Leave-one-class-out: {len(splits)} splits, {doc['epochs']} epochs each",
        "",
        "Threshold at x %: the (1 − x) quantile of the split's validation scores (of its training and validation "
        "scores for the row marked as shipped). Flagged: the share of the held-out "
        "class's images above it; false unknown: the share of the known classes' test images above it. Means over "
        "the splits.",
        "",
        f"| score | mean AUROC | {head} |",
        "|---" * (2 + len(rates)) + "|",
    ]
    for name, by_rate in doc["methods"].items():
        cells = [f"{by_rate[r]['mean']['unknown_flagged']:.1%} / {by_rate[r]['mean']['false_unknown_test']:.1%}"
                 for r in rates]
        lines.append(f"| {name} | {by_rate[rates[0]]['mean']['auroc']:.3f} | " + " | ".join(cells) + " |")
    first = rates[0]
    lines += ["", f"AUROC / flagged at {float(first):.0%}, per held-out class:", "",
              "| score | " + " | ".join(splits) + " |", "|---" * (1 + len(splits)) + "|"]
    for name, by_rate in doc["methods"].items():
        rows = by_rate[first]["splits"]
        lines.append(f"| {name} | " + " | ".join(f"{rows[c]['auroc']:.3f} / {rows[c]['unknown_flagged']:.0%}"
                                               for c in splits) + " |")
    for kind, what in (("mahalanobis", "Mahalanobis on each block's channel mean and standard deviation"),
                       ("knn", f"kNN (k={NEIGHBOURS}) on each block's normalized channel means"),
                       ("correlation", f"kNN (k={NEIGHBOURS}) on each correlation block's channel correlations, "
                                       f"projected on {CORR_DIMS} principal axes")):
        lines += ["", f"{what}, AUROC:", "",
                  "| block | mean | " + " | ".join(splits) + " |", "|---" * (2 + len(splits)) + "|"]
        for block, rows in doc["per_block_auroc"][kind].items():
            lines.append(f"| {block} | {np.mean(list(rows.values())):.3f} | "
                         + " | ".join(f"{rows[c]:.3f}" for c in splits) + " |")
    lines += ["", "Known-class test accuracy per split: " + "; ".join(
        f"without {c} {a:.1%}" for c, a in doc["accuracy"].items()), ""]
    return "\n".join(lines)


def plot_scores(splits: list[SplitOutputs], scores: dict[str, np.ndarray], rows: dict[str, dict], path: Path) -> None:
    """Per split: histograms of the served score on known test, validation and held-out images, and the threshold."""
    from trainer.figures import figure

    cols = 3
    with figure(path, -(-len(splits) // cols), cols, size=(4.2 * cols, 3.0 * -(-len(splits) // cols)), dpi=110) as (_, axes):
        for ax, out in zip(np.atleast_1d(axes).flat, splits):
            score, row = scores[out.held_out], rows[out.held_out]
            bins = np.linspace(score.min(), np.quantile(score, 0.995), 50)
            for name, colour in (("test", "tab:blue"), ("val", "tab:green"), ("unknown", "tab:red")):
                label = {"test": "known (test)", "val": "known (validation)", "unknown": f"{out.held_out} (unknown)"}[name]
                ax.hist(np.clip(score[out.where(name).numpy()], None, bins[-1]), bins=bins, alpha=0.55,
                        color=colour, density=True, label=label)
            ax.axvline(row["threshold"], color="black", lw=1, ls="--")
            ax.set_title(f"without {out.held_out}: AUROC {row['auroc']:.3f}, flagged {row['unknown_flagged']:.0%}",
                         fontsize=9)
            ax.set_xlabel("served unknown score", fontsize=8)
            ax.legend(fontsize=7)
