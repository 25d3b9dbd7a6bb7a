"""Models for tests: BN statistics worth testing against, and tiny checkpoints in the published layout."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from schemas.checkpoint import MANIFEST_NAME, BoxHeadSpec, InputSpec
from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import export_checkpoint
from stripnet.boxhead import BoxHead
from stripnet.network import RepNet, build_model
from tests.helpers import NEU_CLASSES

TINY_INPUT = InputSpec(size=32)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine terms, so fusion and backends are tested on real numbers."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


def export_untrained(dst: Path, version: str, *, classes: tuple[str, ...] = NEU_CLASSES, seed: int = 0,
                     input_spec: InputSpec = InputSpec(), model_name: str = "test-eg-repvgg") -> Path:
    """A fused, untrained EG-RepVGG checkpoint written at `dst`."""
    torch.manual_seed(seed)
    export_checkpoint(build_model(EG_REPVGG, len(classes)), dst, class_names=classes, model_name=model_name,
                      model_version=version, input_spec=input_spec)
    return dst


def export_tiny(dst: Path, version: str, *, classes: tuple[str, ...] = NEU_CLASSES, seed: int = 0) -> Path:
    """An untrained checkpoint taking 32×32 inputs (about a second to write), so a test's time goes into what it
    tests (restarts, backlogs, swaps), not into convolutions."""
    return export_untrained(dst, version, classes=classes, seed=seed, input_spec=TINY_INPUT, model_name="tiny")


def with_version(src: Path, dst: Path, version: str) -> Path:
    """A copy of checkpoint `src` at `dst` that only differs by its manifest's model_version (same weights)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    manifest["model_version"] = version
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))
    return dst


def version_dir_name(stamp: int, version: str) -> str:
    """A model-directory entry name in the published layout; a greater `stamp` is a newer version."""
    return f"20250101T{stamp:06d}.000000Z-{version}"


def head_spec(layers: tuple[int, ...] = (3, 7, 8), hidden: int = 8, score_threshold: float = 0.3) -> BoxHeadSpec:
    return BoxHeadSpec(layers=layers, hidden=hidden, score_threshold=score_threshold, fitted_images=1)


def with_random_head(model: RepNet, spec: BoxHeadSpec | None = None, seed: int = 0) -> RepNet:
    """A copy of `model` carrying an untrained localization head with non-trivial BN statistics, whose centre
    maps peak somewhere in every frame (a positive bias on the heat logits)."""
    torch.manual_seed(seed)
    out = copy.deepcopy(model)
    out.boxes = randomize_bn(BoxHead(model.spec, model.num_classes, spec or head_spec()), seed).eval()
    with torch.no_grad():
        out.boxes.out.bias[:model.num_classes].fill_(0.5)
    return out
