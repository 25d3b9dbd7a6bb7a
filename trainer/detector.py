"""The unknown detector of a trained model: fitted on its own training images, calibrated on held-in images.

`fit_detector` is what `trainer fit` runs before it exports a model. By default (`combined`) it fits several
detectors and adds their scores. One is class Gaussians with one shared covariance on block 2's channel
means and log deviations (stripnet.ood.OODHead): texture statistics the classifier was never trained to
throw away, which flag clearly foreign frames (noise, checkerboards). The others, one per block from block 3
on, keep the training part's L2-normalized pooled features of that block and score a frame by the distance
to its k-th nearest kept image (stripnet.ood.KNNHead): better on new defect types, blind to noise fields.
The last, one per block of blocks 3–5, do the same on the block's channel correlations, projected on their
first principal axes (stripnet.ood.CorrelationKNN): they flag more of the new defect types.
Each is standardized by its held-in scores before the sum, and the sum by the held-in sums of the images
predicted as the frame's class (stripnet.ood.combine); `--method mahalanobis` or `knn` (the last block)
serves one part alone (docs/openset.md has them all). The threshold is the (1 − rate) quantile of the scores
of every held-in image, training and validation parts together, each training image scored as a new frame
would be (by kNN, among the *other* kept images: `KNNHead.fitted_scores`); so a model trained on every
image still gets an honest threshold. `refit_checkpoint` (`trainer detector`) does the same for a checkpoint
that has none yet, or whose detector should be re-fitted, and rewrites it in place with every other manifest
field kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch

from schemas.checkpoint import InputSpec, OODSpec
from stripnet.bundled import resolve_model_dir
from stripnet.checkpoint import load_checkpoint, rewrite_checkpoint
from stripnet.network import RepNet
from stripnet.ood import (CombinedHead, Detector, calibrate, combine, correlation_dim, fit_correlation_knn, fit_head,
                          fit_knn, with_detector)
from stripnet.preprocess import normalize
from trainer.data import ImageSet, fingerprint, load_image_folder, load_split, stratified_split
from trainer.options import Opt, parse_split

Spread = Literal["std", "log_std"]
Method = Literal["combined", "knn", "mahalanobis"]

DEFAULT_FALSE_UNKNOWN_RATE = 0.01
# the sum of both: Mahalanobis alone misses most new defect types, kNN alone lets noise fields through as
# defects (docs/openset.md)
DEFAULT_METHOD: Method = "combined"
MAHALANOBIS_LAYER = 1  # for Mahalanobis, the second block: its best block (docs/openset.md)
KNN_FROM = 2  # combined: a kNN part on every block from the third on (docs/openset.md)
CORR_BLOCKS = 3  # combined: a correlation part on each of the three blocks from KNN_FROM on (docs/openset.md)
CORR_DIMS = 32  # each projected on its first 32 principal axes (docs/openset.md)
DEFAULT_SPREAD: Spread = "log_std"  # Mahalanobis: deviations as logs (docs/openset.md)
NEIGHBOURS = 10


@torch.inference_mode()
def features_and_logits(model: RepNet, images: torch.Tensor, spec: InputSpec, layers: tuple[int, ...],
                        corr_layers: tuple[int, ...] = (), batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, S) uint8 images → (N, K) detector features (channel statistics of the blocks `layers`, then
    channel correlations of `corr_layers`) and (N, classes) logits."""
    model.eval()
    out = [model.forward_with_features(normalize(images[i:i + batch_size], spec), layers, corr_layers)
           for i in range(0, len(images), batch_size)]
    return torch.cat([o[1] for o in out]), torch.cat([o[0] for o in out])


def model_labels(data: ImageSet, class_names: tuple[str, ...]) -> torch.Tensor:
    """The data's labels as indices into the model's `class_names` (ValueError for a class it does not know)."""
    index = {name: i for i, name in enumerate(class_names)}
    missing = sorted(set(data.class_names) - set(index))
    if missing:
        raise ValueError(f"the data has classes the model does not know: {missing}")
    return torch.tensor([index[data.class_names[y]] for y in data.labels.tolist()], dtype=torch.long)


def default_knn_layers(blocks: int) -> tuple[int, ...]:
    """The combined detector's kNN blocks for a network of `blocks` blocks: every one from `KNN_FROM` on."""
    return tuple(range(min(KNN_FROM, blocks - 1), blocks))


def default_corr_layers(blocks: int) -> tuple[int, ...]:
    """The combined detector's correlation blocks: `CORR_BLOCKS` from `KNN_FROM` on, never the last (the matrix of
    its many channels costs a sixth of EG-RepVGG's multiply-adds)."""
    start = min(KNN_FROM, blocks - 1)
    return tuple(range(start, min(start + CORR_BLOCKS, blocks - 1)))


@dataclass(frozen=True)
class Blocks:
    """Which blocks a detector reads: `layer` (the Mahalanobis part, or the kNN one of `--method knn`), then
    combined's kNN parts' and correlation parts' blocks."""
    layer: int
    knn: tuple[int, ...] = ()
    corr: tuple[int, ...] = ()

    @property
    def stats(self) -> tuple[int, ...]:
        return (self.layer, *self.knn)


def detector_layers(method: Method, blocks: int, layer: int | None = None, knn_layers: tuple[int, ...] = (),
                    corr_layers: tuple[int, ...] = (), corr_dims: int = CORR_DIMS) -> Blocks:
    """The blocks of a detector for a network of `blocks` blocks: `layer` unset, the method's own (the last for
    knn, `MAHALANOBIS_LAYER` otherwise); combined's kNN blocks unset, `default_knn_layers`; its correlation
    blocks unset, `default_corr_layers`, and none when `corr_dims` is 0."""
    layer = (blocks - 1 if method == "knn" else MAHALANOBIS_LAYER) if layer is None else layer
    if method != "combined":
        return Blocks(layer)
    return Blocks(layer, knn_layers or default_knn_layers(blocks),
                  (corr_layers or default_corr_layers(blocks)) if corr_dims else ())


def score_all(head: Detector, features: torch.Tensor, logits: torch.Tensor, fitted: torch.Tensor) -> torch.Tensor:
    """Every image's score, the images the detector was fitted on (mask `fitted`) scored as `fitted_scores` does."""
    with torch.no_grad():
        scores = head(features, logits)
        scores[fitted] = head.fitted_scores(features[fitted], logits[fitted])
    return scores


def fit_detector(model: RepNet, class_names: tuple[str, ...], train: ImageSet, held_in: ImageSet | None,
                 spec: InputSpec, rate: float = DEFAULT_FALSE_UNKNOWN_RATE, method: Method = DEFAULT_METHOD,
                 layer: int | None = None, spread: Spread = DEFAULT_SPREAD, knn_layers: tuple[int, ...] = (),
                 per_class: bool = True, corr_layers: tuple[int, ...] = (), corr_dims: int = CORR_DIMS,
                 neighbours: int = NEIGHBOURS) -> RepNet:
    """A copy of `model` carrying its unknown detector: fitted on `train`, calibrated on `train` and `held_in`;
    the blocks as `detector_layers` chooses them, each kNN part scoring by its `neighbours`-th nearest kept image.
    Combined standardizes the sum per predicted class with `per_class`."""
    channels = [row.out_channels for row in model.spec.blocks]
    chosen = detector_layers(method, len(channels), layer, knn_layers, corr_layers, corr_dims)
    per_class = per_class and method == "combined"
    features, logits = features_and_logits(model, train.images, spec, chosen.stats, chosen.corr)
    held, held_logits = (features_and_logits(model, held_in.images, spec, chosen.stats, chosen.corr)
                         if held_in is not None and len(held_in) else (features[:0], logits[:0]))
    head, described = fit_method(method, Fitting(features, logits), model_labels(train, class_names),
                                 Fitting(held, held_logits), len(class_names),
                                 [2 * channels[b] for b in chosen.stats], spread, per_class=per_class,
                                 corr_widths=[correlation_dim(channels[b]) for b in chosen.corr],
                                 corr_dims=corr_dims, neighbours=neighbours)
    with torch.inference_mode():
        scores = torch.cat([head.fitted_scores(features, logits), head(held, held_logits)])
    ood = OODSpec(method=method, layer=chosen.layer, knn_layers=chosen.knn, corr_layers=chosen.corr,
                  per_class=per_class, **described,
                  threshold=calibrate(scores.numpy(), rate), false_unknown_rate=rate,
                  calibrated_on="training and validation" if len(held) else "training",
                  calibration_images=len(scores), fitted_images=len(train))
    return with_detector(model, head, ood)


def refit_as(model: RepNet, class_names: tuple[str, ...], train: ImageSet, held_in: ImageSet | None,
             spec: InputSpec, ood: OODSpec) -> RepNet:
    """`fit_detector` again for the detector `ood` describes (its method, blocks, options and rate), on new
    images or after the network's features moved."""
    return fit_detector(model, class_names, train, held_in, spec, rate=ood.false_unknown_rate, method=ood.method,
                        layer=ood.layer, spread=ood.spread, knn_layers=ood.knn_layers, per_class=ood.per_class,
                        corr_layers=ood.corr_layers, corr_dims=ood.corr_dims, neighbours=ood.neighbours)


@dataclass(frozen=True)
class Fitting:
    """Images' detector features (N, K) and logits (N, classes)."""
    features: torch.Tensor
    logits: torch.Tensor


def fit_method(method: Method, train: Fitting, labels: torch.Tensor, held: Fitting, num_classes: int,
               widths: list[int], spread: Spread, *, per_class: bool = False, corr_widths: list[int] | None = None,
               corr_dims: int = CORR_DIMS, neighbours: int = NEIGHBOURS) -> tuple[Detector, dict]:
    """The detector of `method` fitted on `train` (class `labels`) and standardized on `train` and `held`, whose
    features are the blocks' statistics side by side (`widths` columns each; combined: the first block's are the
    Mahalanobis part's, each other block's a kNN part's), then combined's blocks' channel correlations
    (`corr_widths` columns each, a correlation part each, projected on `corr_dims` axes), each kNN part scoring
    by its `neighbours`-th nearest kept image, and the spec fields that describe it."""
    features = train.features
    neighbours = min(neighbours, len(features) - 1)  # a tiny training part keeps fewer
    if method == "knn":
        return fit_knn(features, neighbours), {"neighbours": neighbours}
    texture = fit_head(features[:, :widths[0]], labels, num_classes, log_spread=spread == "log_std")
    if method == "mahalanobis":
        return texture, {"spread": spread}
    corr_widths = corr_widths or []
    bounds = np.cumsum([0, *widths, *corr_widths]).tolist()
    columns = [features[:, a:b] for a, b in zip(bounds[1:], bounds[2:])]
    dims = min([corr_dims, len(features), *corr_widths])  # one size for every part, as the spec has one
    knns = [fit_knn(x, neighbours) for x in columns[:len(widths) - 1]]
    knns += [fit_correlation_knn(x, neighbours, dims) for x in columns[len(widths) - 1:]]
    raw = CombinedHead(texture, knns)
    held_in = torch.cat([raw.part_scores(features, fitted=True), raw.part_scores(held.features)])
    predicted = torch.cat([train.logits, held.logits]).argmax(dim=1) if per_class else None
    return (combine(texture, knns, held_in, predicted, num_classes),
            {"spread": spread, "neighbours": neighbours, "corr_dims": dims if corr_widths else 0})


def unknown_scores(model: RepNet, images: torch.Tensor, spec: InputSpec) -> np.ndarray:
    """The served unknown score of each image; ValueError when the model carries no detector."""
    if model.ood is None:
        raise ValueError("this model has no unknown detector (fit one with `trainer detector`)")
    features, logits = features_and_logits(model, images, spec, model.ood.spec.layers, model.ood.spec.corr_layers)
    with torch.inference_mode():
        return model.ood(features, logits).numpy()


@dataclass(frozen=True)
class DetectorConfig:
    model: Annotated[Path, "checkpoint directory ('default': the bundled model), rewritten in place"]
    data: Annotated[Path, "the image folder the model was trained on (its data fingerprint is checked)"]
    split_file: Annotated[Path | None, "the run's split.json: its train part fits, train + val calibrate"] = None
    split: Annotated[tuple[float, ...], Opt("without --split-file: the train:val[:test] split the run drew",
                                            parse=parse_split)] = (0.8, 0.1, 0.1)
    split_seed: Annotated[int, "without --split-file: the seed of that split"] = 0
    false_unknown_rate: Annotated[float, "the share of held-in images the threshold flags"] = DEFAULT_FALSE_UNKNOWN_RATE
    method: Annotated[Method, "knn: distance to the k-th nearest training image's pooled features; mahalanobis: "
                              "to the nearest class Gaussian of a block's channel statistics; combined: the two "
                              "added, each scaled by its held-in scores"] = DEFAULT_METHOD
    layer: Annotated[int | None, "the block (0-based) whose channel statistics are the features (unset: the last "
                                 "block for knn, the second for mahalanobis and combined's Mahalanobis part)"] = None
    spread: Annotated[Spread, "mahalanobis: the deviations as they are, or as logs"] = DEFAULT_SPREAD
    knn_layers: Annotated[tuple[int, ...], "combined: the blocks (0-based) of the kNN parts (unset: every block "
                                           f"from index {KNN_FROM} on: the third)"] = ()
    per_class: Annotated[bool, "combined: standardize the score by the held-in scores of the images predicted as "
                               "the frame's class"] = True
    corr_layers: Annotated[tuple[int, ...], "combined: the blocks (0-based) of the channel-correlation parts "
                                            f"(unset: {CORR_BLOCKS} from index {KNN_FROM} on, never the last)"] = ()
    corr_dims: Annotated[int, "combined: the principal axes each correlation part keeps (0: no correlation "
                              "parts)"] = CORR_DIMS
    neighbours: Annotated[int, "knn and combined: score by the distance to the k-th nearest kept training "
                               "image"] = NEIGHBOURS


def refit_checkpoint(cfg: DetectorConfig) -> OODSpec:
    """Fit the detector of the checkpoint `cfg.model` on its training part of `cfg.data` (`split_file`, or the
    seeded stratified `split` its run drew) and rewrite the checkpoint in place, every other field kept."""
    model_dir = resolve_model_dir(cfg.model)
    model, manifest = load_checkpoint(model_dir)
    data = load_image_folder(cfg.data, manifest.input.size, color=manifest.input.color)
    if manifest.data_fingerprint and fingerprint(data) != manifest.data_fingerprint:
            raise ValueError(f"{cfg.data} is not the data {model_dir} was trained on (data fingerprint differs)")
    parts = load_split(cfg.split_file, data) if cfg.split_file else stratified_split(data.labels, cfg.split,
                                                                                     cfg.split_seed)
    held_in = data.subset(parts[1]) if len(parts) > 1 and parts[1] else None
    fitted = fit_detector(model, manifest.class_names, data.subset(parts[0]), held_in, manifest.input,
                          rate=cfg.false_unknown_rate, method=cfg.method, layer=cfg.layer, spread=cfg.spread,
                          knn_layers=cfg.knn_layers, per_class=cfg.per_class, corr_layers=cfg.corr_layers,
                          corr_dims=cfg.corr_dims, neighbours=cfg.neighbours)
    written = rewrite_checkpoint(fitted, model_dir, manifest)
    assert written.ood is not None
    return written.ood


def unknown_report(model: RepNet, data: ImageSet, spec: InputSpec, threshold: float | None = None) -> dict:
    """The share of `data`'s images the model's detector calls unknown, overall and per class folder, at its
    calibrated threshold (or `threshold`): what a new camera's images would get before going live."""
    if model.ood is None or model.ood.spec is None:
        raise ValueError("this model has no unknown detector (fit one with `trainer detector`)")
    limit = model.ood.spec.threshold if threshold is None else threshold
    unknown = unknown_scores(model, data.images, spec) > limit
    labels = data.labels.numpy()
    return {"threshold": limit, "calibrated_rate": model.ood.spec.false_unknown_rate, "images": len(data),
            "unknown_rate": float(unknown.mean()) if len(data) else 0.0,
            "per_class": {name: float(unknown[labels == i].mean()) for i, name in enumerate(data.class_names)
                          if (labels == i).any()}}
