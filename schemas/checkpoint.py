"""The checkpoint contract: what a fused model directory holds and promises.

A checkpoint directory is `manifest.json` plus one safetensors weights file. The
manifest carries everything a reader needs to build, validate and describe the
model without importing training code.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CHECKPOINT_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.safetensors"
Color = Literal["gray", "rgb"]  # what a model takes: 8-bit gray, or 8-bit RGB in that channel order


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BlockSpec(_Frozen):
    """One RepVGG block: its output width and stride (the identity branch exists iff in == out and stride 1)."""

    out_channels: int = Field(gt=0)
    stride: Literal[1, 2] = 1


class ArchitectureSpec(_Frozen):
    """A plain chain of RepVGG blocks followed by global average pooling and a linear head."""

    name: str
    in_channels: int = Field(default=3, gt=0)
    blocks: tuple[BlockSpec, ...] = Field(min_length=1)
    activation: Literal["gelu", "relu"]
    attention: Literal["eca", "none"]
    eca_kernel_size: int = Field(default=3, gt=0)


class Normalization(_Frozen):
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="after")
    def _positive_std(self) -> Normalization:
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("mean and std need equal lengths and a positive std")
        return self


class InputSpec(_Frozen):
    """Frames are decoded to `color` (8-bit gray, or 8-bit RGB in that channel order), resized to
    `size`×`size`, normalized per channel; a gray plane is replicated to `channels`."""

    size: int = Field(default=200, gt=0)
    channels: int = Field(default=3, gt=0)
    color: Color = "gray"
    normalization: Normalization = Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    @model_validator(mode="after")
    def _channels_match(self) -> InputSpec:
        if len(self.normalization.mean) != self.channels:
            raise ValueError(f"normalization has {len(self.normalization.mean)} values for {self.channels} channels")
        if self.color == "rgb" and self.channels != 3:
            raise ValueError(f"an rgb input has 3 channels, not {self.channels}")
        return self


class OODSpec(_Frozen):
    """The unknown (out-of-distribution) detector saved with the weights as `ood.*` tensors (stripnet/ood.py):
    a frame whose score exceeds `threshold` is unknown."""

    method: Literal["mahalanobis", "knn", "combined"] = Field(
        default="mahalanobis", description="mahalanobis: the distance to the nearest class Gaussian; knn: the "
        "distance of the L2-normalized channel means to their k-th nearest training image; combined: the sum of "
        "Mahalanobis on `layer` and one kNN distance per block of `knn_layers`, each scaled by its held-in scores")
    layer: int = Field(ge=0, description="the block (0-based) whose output's per-channel mean and standard "
                                         "deviation are the detector's features")
    knn_layers: tuple[int, ...] = Field(default=(), description="combined: the blocks of the kNN parts, one each")
    corr_layers: tuple[int, ...] = Field(default=(), description="combined: the blocks of the channel-correlation "
                                         "kNN parts, one each (after the kNN parts)")
    corr_dims: int = Field(default=0, ge=0, le=4096, description="combined: the size each correlation part projects "
                           "its block's channel correlations to (0 without correlation parts)")
    per_class: bool = Field(default=False, description="combined: the sum is standardized once more by the held-in "
                            "scores of the images predicted as the frame's class")
    neighbours: int = Field(default=10, gt=0, le=100,
                            description="knn, and combined's kNN parts: which nearest training image's distance")
    spread: Literal["std", "log_std"] = Field(default="std", description="the second half of the features: each "
                                              "channel's standard deviation, or its natural log")
    threshold: float = Field(description="score above which a frame is unknown (combined: a sum of standardized "
                                         "distances, which may be negative)")
    false_unknown_rate: float = Field(gt=0, lt=1, description="the share of held-in images it was calibrated to flag")
    calibrated_on: Literal["training and validation", "training", "validation"] = Field(
        description="the held-in images whose scores the threshold is the quantile of (docs/openset.md)")
    calibration_images: int = Field(gt=0)
    fitted_images: int = Field(gt=0, le=200_000, description="training images the class means and covariance "
                                                          "come from (knn: the images it keeps)")

    @model_validator(mode="before")
    @classmethod
    def _one_knn_layer(cls, data: object) -> object:
        """Checkpoints written before several kNN blocks name their one block `knn_layer`."""
        if isinstance(data, dict) and "knn_layer" in data:
            data = dict(data)
            layer = data.pop("knn_layer")
            data.setdefault("knn_layers", () if layer is None else (layer,))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> OODSpec:
        if self.method != "mahalanobis" and self.neighbours > self.fitted_images:
            raise ValueError(f"knn needs at least {self.neighbours} kept images, got {self.fitted_images}")
        if (self.method == "combined") != bool(self.knn_layers):
            raise ValueError("knn_layers is set for the combined method, and only for it")
        if self.per_class and self.method != "combined":
            raise ValueError("per_class is for the combined method only")
        for name, blocks in (("knn_layers", self.knn_layers), ("corr_layers", self.corr_layers)):
            if any(b < 0 for b in blocks) or len(set(blocks)) != len(blocks):
                raise ValueError(f"{name} must be distinct block indices, got {blocks}")
        if self.corr_layers and self.method != "combined":
            raise ValueError("corr_layers is for the combined method only")
        if bool(self.corr_layers) != (self.corr_dims > 0):
            raise ValueError("corr_dims is set when, and only when, there are corr_layers")
        return self

    @property
    def layers(self) -> tuple[int, ...]:
        """The blocks whose channel statistics the detector reads, in the order of its features."""
        return (self.layer, *self.knn_layers)

    @property
    def blocks(self) -> tuple[int, ...]:
        """Every block the detector reads: `layers`, then `corr_layers`."""
        return (*self.layers, *self.corr_layers)


class BoxHeadSpec(_Frozen):
    """The localization head saved with the weights as `boxes.*` tensors (stripnet/boxhead.py): a centre heat
    map per class and the box's offset and size, on the finest of the blocks `layers` (CenterNet style)."""

    method: Literal["centernet"] = "centernet"
    layers: tuple[int, ...] = Field(min_length=1, max_length=4, description="the blocks (0-based) whose outputs "
                                    "the head reads, finest first; coarser ones are repeated up to its size")
    hidden: int = Field(gt=0, le=256, description="channels of the head's one 3×3 block")
    score_threshold: float = Field(default=0.3, gt=0, lt=1, description="a centre below this is not a box")
    class_thresholds: tuple[Annotated[float, Field(gt=0, lt=1)], ...] | None = Field(
        default=None, description="per class (in class_names order), the centre score below which a box of a frame "
                                  "of that class is not served, chosen on annotated images the head did not train "
                                  "on; none: score_threshold for every class")
    max_boxes: int = Field(default=8, gt=0, le=64, description="at most this many boxes per frame, best first")
    min_boxes: int = Field(default=0, ge=0, le=64, description="at least this many boxes per frame where the head "
                                                                "has that many centres: the strongest, below the "
                                                                "threshold if need be; 0: none below it")
    fitted_images: int = Field(gt=0, description="annotated images the head was trained on")
    annotations: str = Field(default="", description="where the training boxes came from")
    recipe: dict[str, str | int | float | bool | None] = Field(
        default={}, description="the training settings that shaped the head (trainer boxes' HeadConfig); empty for "
                                "a head trained before they were recorded")

    @model_validator(mode="after")
    def _min_within_max(self) -> BoxHeadSpec:
        if self.min_boxes > self.max_boxes:
            raise ValueError(f"min_boxes {self.min_boxes} exceeds max_boxes {self.max_boxes}")
        return self


class Manifest(_Frozen):
    format_version: Literal[1] = CHECKPOINT_FORMAT_VERSION
    model_name: str
    model_version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    architecture: ArchitectureSpec
    deploy: bool = True
    class_names: tuple[str, ...] = Field(min_length=2)
    input: InputSpec = InputSpec()
    weights_file: str = WEIGHTS_NAME
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    parameters: int = Field(ge=0)
    macs: int = Field(ge=0)
    metrics: dict[str, float] = {}
    recipe: dict[str, str | int | float | bool | None] = Field(
        default={}, description="the training settings that shaped the weights (trainer's TrainConfig)")
    data_fingerprint: str = ""
    teacher: str | None = None
    ood: OODSpec | None = Field(default=None, description="the unknown detector; none: every frame gets a class")
    boxes: BoxHeadSpec | None = Field(default=None, description="the localization head; none: boxes come from "
                                                                "the class activation map")
    created_at: datetime
    notes: str = ""

    @model_validator(mode="after")
    def _unique_classes(self) -> Manifest:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        if self.ood is not None and max(self.ood.blocks) >= len(self.architecture.blocks):
            raise ValueError(f"ood blocks {self.ood.blocks} are not all blocks of the architecture")
        if self.boxes is not None and max(self.boxes.layers) >= len(self.architecture.blocks):
            raise ValueError(f"boxes.layers {self.boxes.layers} are not all blocks of the architecture")
        if self.boxes is not None and self.boxes.class_thresholds is not None and len(
                self.boxes.class_thresholds) != len(self.class_names):
            raise ValueError(f"boxes.class_thresholds has {len(self.boxes.class_thresholds)} values for "
                             f"{len(self.class_names)} classes")
        return self
