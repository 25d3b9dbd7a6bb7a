"""The unknown detector: how far a frame's features lie from every class the model learned.

The features f of a frame are the per-channel mean and standard deviation of one block's output
(`channel_stats`; `OODSpec.layer` names the block; `OODSpec.spread` "log_std" takes the deviations' logs,
which are closer to Gaussian), taken in the same forward pass as the logits: a
texture description that the classifier was never trained to throw away. They are modelled per
class as Gaussians that share one covariance Σ (Lee et al., NeurIPS 2018); a frame's score is the
Mahalanobis distance to the nearest class mean,

    d(f) = min_c ‖(f − μ_c) W‖ = min_c ‖f W − μ_c W‖,   W Wᵀ = Σ⁻¹,

so serving costs one K×K product per frame plus the statistics (K = 18 for the second block of
EG-RepVGG). Σ is the Ledoit–Wolf shrinkage estimate (no parameter to tune). A frame is unknown when
d(f) exceeds a threshold calibrated as the (1 − rate) quantile of held-in images' scores
(`calibrate`). The block, and this score over energy, kNN, max-softmax and the last block's pooled
features, were chosen by measurement: docs/openset.md.

`KNNHead` (`OODSpec.method` "knn", on the last block) keeps the training images' L2-normalized channel
means of one block (of the last: the pooled features the linear head reads) and scores a frame by the
distance to its k-th nearest one (Sun et al., ICML 2022): better on new defect types for a well-trained
network, blind to noise.

`CombinedHead` (`OODSpec.method` "combined", the default `trainer fit` ships) adds block 2's Mahalanobis
distance, one kNN distance per block of `OODSpec.knn_layers` (by default every block from block 3 on) and one
`CorrelationKNN` distance per block of `OODSpec.corr_layers` (kNN on the projected channel correlations of
`channel_correlations`, by default blocks 3–5), each less its held-in median and divided by the distance from
that median to its held-in 99th percentile.
With `OODSpec.per_class` the sum is standardized once more, by the held-in sums of the images predicted as
the frame's class, so that one threshold means the same for every class. Texture flags noise and foreign
surfaces, kNN new defect types, the middle blocks' kNN more of them than the last block's, and the channel
correlations more again; the sum scores better than any part in leave-one-class-out (docs/openset.md).

`OODHead` is the fitted detector as a module of two buffers. A RepNet that carries one (`model.ood`,
see `with_detector`) saves it in its weights file, and the manifest describes it (`Manifest.ood`), so a
checkpoint's sha256 covers the detector too.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from schemas.checkpoint import OODSpec

if TYPE_CHECKING:
    from stripnet.network import RepNet


class OODHead(nn.Module):
    """Features (N, K) → (N,) float32 Mahalanobis distance to the nearest class mean. `spec` (layer, threshold,
    calibration) is set once the threshold is calibrated (`with_detector`); a checkpoint needs it. With
    `log_spread` (the spec's `spread`, when there is one) the deviations are compared as logs."""

    def __init__(self, num_classes: int, dim: int, spec: OODSpec | None = None, *, log_spread: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.log_spread = spec.spread == "log_std" if spec is not None else log_spread
        self.register_buffer("whiten", torch.eye(dim))  # W, (K, K)
        self.register_buffer("centres", torch.zeros(num_classes, dim))  # μ_c W, (C, K)

    def fits(self, num_classes: int, dim: int) -> bool:
        return tuple(self.centres.shape) == (num_classes, dim)

    def fitted_scores(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of the images the detector was fitted on: as any frame's (it keeps none of them)."""
        with torch.no_grad():
            return self(features)

    def forward(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        # fp32 whatever the caller's precision: a sum of squares loses too much in bf16 or fp16.
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            z = (log_of_spread(features) if self.log_spread else features) @ self.whiten.float()
            centres = self.centres.float()
            squared = (z * z).sum(dim=1, keepdim=True) - 2 * z @ centres.T + (centres * centres).sum(dim=1)
            return squared.min(dim=1).values.clamp(min=0).sqrt()


class KNNHead(nn.Module):
    """Features (N, 2C) → (N,) float32 distance of the L2-normalized channel means to the k-th nearest of the
    kept training images' (Sun et al., ICML 2022, on the last block's pooled features: the linear head's
    input). `spec` as for `OODHead`."""

    def __init__(self, kept: int, channels: int, spec: OODSpec | None = None, *, neighbours: int = 10) -> None:
        super().__init__()
        self.spec = spec
        self.neighbours = spec.neighbours if spec is not None else neighbours
        self.register_buffer("bank", torch.zeros(kept, channels))  # unit vectors, (M, C)

    @property
    def width(self) -> int:
        """How many feature columns it reads."""
        return 2 * self.bank.shape[1]

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The vectors it compares with its bank, before normalization: here the channel means."""
        return features[:, :self.bank.shape[1]]

    def forward(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.distances(features, self.neighbours)

    def distances(self, features: torch.Tensor, k: int) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            unit = F.normalize(self.embed(features.float()), dim=1)
            kth_cosine = (unit @ self.bank.float().T).topk(k, dim=1).values[:, -1]
            return (2 - 2 * kth_cosine).clamp(min=0).sqrt()  # ‖a − b‖ of unit vectors

    def fits(self, num_classes: int, dim: int) -> bool:
        return self.width == dim

    def fitted_scores(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of the kept images as if each were new: each is its own nearest neighbour, so its k-th among
        the others is its (k+1)-th."""
        with torch.no_grad():
            return self.distances(features, self.neighbours + 1)


class CorrelationKNN(KNNHead):
    """kNN on a block's channel correlations (`channel_correlations`, D = C(C − 1)/2 columns): each is
    standardized by the training images' mean and deviation and projected on their first `dims` principal
    axes, both folded into one (D, dims) `projection` and a `shift`; then compared as `KNNHead` compares the
    channel means. Which channels rise and fall together describes a texture that a classifier trained on
    the known classes keeps little of (docs/openset.md)."""

    def __init__(self, kept: int, dim: int, dims: int, *, neighbours: int = 10) -> None:
        super().__init__(kept, dims, neighbours=neighbours)
        self.register_buffer("projection", torch.zeros(dim, dims))
        self.register_buffer("shift", torch.zeros(dims))

    @property
    def width(self) -> int:
        return self.projection.shape[0]

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.projection.float() - self.shift.float()


class CombinedHead(nn.Module):
    """Features (N, K + 2C₁ + 2C₂ … + D₁ …): block `spec.layer`'s statistics, then those of each block of
    `spec.knn_layers`, then the channel correlations of each block of `spec.corr_layers` → (N,) float32 sum of
    the Mahalanobis distance and one kNN distance per block (`CorrelationKNN` parts last), each
    standardized as (d − offset) / scale by its held-in scores. With `classes` (`spec.per_class`) the sum is
    standardized once more by the held-in sums of the images predicted as the frame's class, which its logits
    say. The first kNN part is the module `knn` (the name checkpoints with one kNN block have), the others
    `knn_1`, `knn_2`, …"""

    def __init__(self, texture: OODHead, knns: Sequence[KNNHead], spec: OODSpec | None = None, *,
                 classes: int = 0) -> None:
        super().__init__()
        if not knns:
            raise ValueError("a combined detector needs at least one kNN part")
        self.spec, self.texture = spec, texture
        for i, head in enumerate(knns):
            self.add_module(_knn_name(i), head)
        widths = [texture.whiten.shape[0], *(head.width for head in knns)]
        self.bounds = np.cumsum([0, *widths]).tolist()  # each part's columns of the features
        self.register_buffer("offset", torch.zeros(len(widths)))
        self.register_buffer("scale", torch.ones(len(widths)))
        self.register_buffer("class_offset", torch.zeros(classes) if classes else None)
        self.register_buffer("class_scale", torch.ones(classes) if classes else None)

    @property
    def parts(self) -> list[nn.Module]:
        """The Mahalanobis part, then the kNN parts, in the order of the features."""
        return [self.texture, *(getattr(self, _knn_name(i)) for i in range(len(self.bounds) - 2))]

    def forward(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.by_class(self.summed(self.part_scores(features)), logits)

    def fits(self, num_classes: int, dim: int) -> bool:
        return self.texture.fits(num_classes, self.bounds[1]) and dim == self.bounds[-1]

    def fitted_scores(self, features: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.by_class(self.summed(self.part_scores(features, fitted=True)), logits)

    def part_scores(self, features: torch.Tensor, *, fitted: bool = False) -> torch.Tensor:
        """(N, parts): each part's raw distance (`fitted`: of the images the parts were fitted on, as
        `fitted_scores`)."""
        chunks = [features[:, a:b] for a, b in zip(self.bounds, self.bounds[1:])]
        return torch.stack([part.fitted_scores(x) if fitted else part(x) for part, x in zip(self.parts, chunks)], dim=1)

    def summed(self, parts: torch.Tensor) -> torch.Tensor:
        return ((parts - self.offset.float()) / self.scale.float()).sum(dim=1)

    def by_class(self, score: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        if self.class_offset is None or self.class_scale is None:
            return score
        if logits is None:
            raise ValueError("this detector standardizes by the predicted class: pass the frame's logits")
        predicted = logits.argmax(dim=1)
        return (score - self.class_offset.float()[predicted]) / self.class_scale.float()[predicted]


def _knn_name(i: int) -> str:
    return "knn" if i == 0 else f"knn_{i}"


Detector = OODHead | KNNHead | CombinedHead  # a CorrelationKNN is only ever a part of a CombinedHead
DETECTORS: dict[str, type[nn.Module]] = {"mahalanobis": OODHead, "knn": KNNHead, "combined": CombinedHead}


def combine(texture: OODHead, knns: Sequence[KNNHead], held_in: torch.Tensor,
            predicted: torch.Tensor | None = None, classes: int = 0) -> CombinedHead:
    """The detectors as one, each standardized by its column of the (N, 1 + kNN parts) held-in scores (texture,
    then each kNN part): offset the median, scale the distance from it to the 99th percentile. With the held-in
    images' `predicted` classes, the sum is standardized the same way per predicted class (a class predicted
    for fewer than `MIN_PER_CLASS` held-in images takes every image's median and percentile)."""
    head = CombinedHead(texture, knns, classes=classes if predicted is not None else 0)
    median, spread = _median_and_spread(held_in)
    head.offset.copy_(median)
    head.scale.copy_(spread)
    if predicted is not None and head.class_offset is not None and head.class_scale is not None:
        summed = head.summed(held_in)
        overall = _median_and_spread(summed[:, None])
        for c in range(classes):
            mine = summed[predicted == c]
            median, spread = _median_and_spread(mine[:, None]) if len(mine) >= MIN_PER_CLASS else overall
            head.class_offset[c], head.class_scale[c] = median[0], spread[0]
    return head


MIN_PER_CLASS = 20


def _median_and_spread(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of (N, K) scores: the median, and the distance from it to the 99th percentile (1 where 0)."""
    median = scores.double().quantile(0.5, dim=0)
    spread = scores.double().quantile(0.99, dim=0) - median
    return median.float(), torch.where(spread > 0, spread, torch.ones_like(spread)).float()


def fit_knn(features: torch.Tensor, neighbours: int) -> KNNHead:
    """The kNN detector keeping every training image's (N, 2C) features' normalized channel means."""
    _check_kept(features, neighbours)
    head = KNNHead(len(features), features.shape[1] // 2, neighbours=neighbours)
    head.bank.copy_(F.normalize(head.embed(features.float()), dim=1))
    return head


def fit_correlation_knn(features: torch.Tensor, neighbours: int, dims: int) -> CorrelationKNN:
    """The correlation kNN part for training images' (N, D) channel correlations, projected on `dims` axes
    (fewer when there are fewer images or columns)."""
    _check_kept(features, neighbours)
    x = features.double()
    mean, deviation = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
    _, _, axes = torch.linalg.svd((x - mean) / deviation, full_matrices=False)
    axes = axes[:min(dims, len(axes))].T  # (D, dims)
    head = CorrelationKNN(len(features), x.shape[1], axes.shape[1], neighbours=neighbours)
    head.projection.copy_(axes / deviation[:, None])
    head.shift.copy_((mean / deviation) @ axes)
    head.bank.copy_(F.normalize(head.embed(features.float()), dim=1))
    return head


def _check_kept(features: torch.Tensor, neighbours: int) -> None:
    if not 0 < neighbours < len(features):
        raise ValueError(f"the kNN detector needs more than {max(neighbours, 1)} training images, got {len(features)}")


def make_detector(spec: OODSpec, num_classes: int, channels: Sequence[int]) -> Detector:
    """The empty detector a checkpoint's `spec` describes, for blocks of `channels` (the blocks `spec.blocks`; its
    weights load into it)."""
    if spec.method == "knn":
        return KNNHead(spec.fitted_images, channels[0], spec)
    if spec.method == "combined":
        knn = channels[1:len(spec.layers)]
        corr = channels[len(spec.layers):]
        parts = [*(KNNHead(spec.fitted_images, c, neighbours=spec.neighbours) for c in knn),
                 *(CorrelationKNN(spec.fitted_images, correlation_dim(c), spec.corr_dims, neighbours=spec.neighbours)
                   for c in corr)]
        return CombinedHead(OODHead(num_classes, feature_dim(channels[:1]), log_spread=spec.spread == "log_std"),
                            parts, spec, classes=num_classes if spec.per_class else 0)
    return OODHead(num_classes, feature_dim(channels), spec)


def channel_stats(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) block output → (N, 2C) float32: each channel's spatial mean, then its standard deviation."""
    x = x.float()
    # (N, h·w, C) or (N, C, h·w), each a view: a channels-last map reduces faster along its own layout
    pixels, dim = (x.permute(0, 2, 3, 1).flatten(1, 2), 1) if _channels_last(x) else (x.flatten(2), 2)
    # E[x²] − E[x]²: one pass over the map and no centred copy
    mean, mean_square = pixels.mean(dim=dim), pixels.square().mean(dim=dim)
    return torch.cat([mean, (mean_square - mean * mean).clamp(min=0).sqrt()], dim=1)


def channel_correlations(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) block output → (N, C(C − 1)/2) float32: the correlation over the map of every pair of
    channels (the upper triangle of the correlation matrix, row by row)."""
    c = x.shape[1]
    pixels = x.float().flatten(2)
    centred = pixels - pixels.mean(dim=2, keepdim=True)
    unit = centred * centred.square().mean(dim=2, keepdim=True).clamp(min=1e-12).rsqrt()  # unit variance
    correlation = unit @ unit.transpose(1, 2) / pixels.shape[2]
    return correlation.flatten(1)[:, _upper_triangle(c, x.device)]


def _upper_triangle(channels: int, device: torch.device) -> torch.Tensor:
    """The flat indices of a C×C matrix's entries above its diagonal, made on `device` (no host copy, so a CUDA
    graph can replay it). The TorchScript ONNX exporter has no `triu_indices`; for it they are a constant."""
    if torch.onnx.is_in_onnx_export():
        return torch.tensor([row * channels + col for row in range(channels) for col in range(row + 1, channels)],
                            device=device)
    rows, cols = torch.triu_indices(channels, channels, 1, device=device)
    return rows * channels + cols


def correlation_dim(channels: int) -> int:
    return channels * (channels - 1) // 2


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def log_of_spread(stats: torch.Tensor) -> torch.Tensor:
    """(N, 2C) channel means and standard deviations → the means and the deviations' logs (closer to Gaussian)."""
    mean, spread = stats.chunk(2, dim=1)
    return torch.cat([mean, spread.clamp(min=1e-6).log()], dim=1)


def feature_dim(channels_of_layers: Sequence[int]) -> int:
    return 2 * sum(channels_of_layers)


def detector_dim(stats_channels: Sequence[int], corr_channels: Sequence[int] = ()) -> int:
    """The columns of a detector's features: channel statistics of some blocks, then others' correlations."""
    return feature_dim(stats_channels) + sum(correlation_dim(c) for c in corr_channels)


class Scored(nn.Module):
    """x → (logits, unknown scores) in one pass: `net` is anything with a RepNet's `forward_with_features`
    (logits and one block's channel statistics), `ood` scores them. What the runners export and run."""

    def __init__(self, net: nn.Module, ood: Detector) -> None:
        super().__init__()
        if ood.spec is None:
            raise ValueError("the unknown detector has no calibrated spec")
        self.net, self.ood, self.layers, self.corr_layers = net, ood, ood.spec.layers, ood.spec.corr_layers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.net.forward_with_features(x, self.layers, self.corr_layers)
        return logits, self.ood(features, logits)


def scored(net: nn.Module, ood: Detector | None) -> nn.Module:
    """`Scored(net, ood)` when there is a detector, else `net` itself (x → logits)."""
    return Scored(net, ood) if ood is not None else net


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Shrunk covariance of centred samples x (N, K): (1 − s)·S + s·(tr S / K)·I with the Ledoit–Wolf (2004) s."""
    n, k = x.shape
    sample = x.T @ x / n
    mu = torch.trace(sample) / k
    target_distance = ((sample - mu * torch.eye(k, dtype=x.dtype)) ** 2).sum()
    # β² = Σ_i ‖x_i x_iᵀ − S‖²_F / n², how far S is from the true covariance; Σ_i x_iᵀ S x_i = n‖S‖²_F
    spread = (((x * x).sum(dim=1) ** 2).sum() - n * (sample**2).sum()) / n**2
    shrinkage = torch.clamp(spread / target_distance, 0.0, 1.0) if target_distance > 0 else torch.tensor(1.0)
    return (1 - shrinkage) * sample + shrinkage * mu * torch.eye(k, dtype=x.dtype)


def fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, log_spread: bool = False) -> OODHead:
    """The detector for held-in features (N, K) with class labels (N,): class means, shared shrunk covariance
    (of the deviations' logs with `log_spread`)."""
    x = log_of_spread(features.double()) if log_spread else features.double()
    if not all((labels == c).any() for c in range(num_classes)):
        raise ValueError("every class needs training images to fit the unknown detector")
    means = torch.stack([x[labels == c].mean(dim=0) for c in range(num_classes)])
    covariance = ledoit_wolf(x - means[labels])
    # a floor on the spectrum: an untrained or collapsed network can give (near-)constant features
    covariance += torch.eye(x.shape[1], dtype=x.dtype) * max(1e-12, 1e-9 * float(torch.trace(covariance)) / x.shape[1])
    # W = L⁻ᵀ for Σ = L Lᵀ, so W Wᵀ = Σ⁻¹ and ‖(f − μ) W‖² = (f − μ)ᵀ Σ⁻¹ (f − μ)
    chol = torch.linalg.cholesky(covariance)
    whiten = torch.linalg.solve_triangular(chol, torch.eye(x.shape[1], dtype=x.dtype), upper=False).T
    head = OODHead(num_classes, x.shape[1], log_spread=log_spread)
    head.whiten.copy_(whiten.float())
    head.centres.copy_((means @ whiten).float())
    return head


def calibrate(scores: np.ndarray, rate: float) -> float:
    """The threshold above which a share `rate` of held-in `scores` lies (their (1 − rate) quantile)."""
    if not 0.0 < rate < 1.0 or len(scores) == 0:
        raise ValueError(f"calibration needs held-in scores and a rate in (0, 1), got {len(scores)} scores, {rate}")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - rate))


def with_detector(model: RepNet, head: Detector, spec: OODSpec) -> RepNet:
    """A copy of `model` that carries a copy of `head`, calibrated as `spec`, as `model.ood` (export_checkpoint
    saves it with the weights)."""
    blocks = model.spec.blocks
    if not isinstance(head, DETECTORS[spec.method]):
        raise ValueError(f"a {type(head).__name__} is not a {spec.method} detector")
    if max(spec.blocks) >= len(blocks) or not head.fits(model.num_classes, detector_dim(
            [blocks[i].out_channels for i in spec.layers], [blocks[i].out_channels for i in spec.corr_layers])):
        raise ValueError(f"detector {type(head).__name__} at blocks {spec.blocks} does not fit the model")
    if isinstance(head, CombinedHead) and (head.class_offset is not None) != spec.per_class:
        raise ValueError(f"the detector is {'' if head.class_offset is not None else 'not '}standardized per class, "
                         f"its spec says per_class={spec.per_class}")
    texture = head.texture if isinstance(head, CombinedHead) else head
    if isinstance(texture, OODHead) and texture.log_spread != (spec.spread == "log_std"):
        raise ValueError(f"the detector was fitted {'with' if head.log_spread else 'without'} log deviations, "
                         f"its spec says spread={spec.spread!r}")
    out = copy.deepcopy(model)
    out.ood = copy.deepcopy(head)
    out.ood.spec = spec
    return out
