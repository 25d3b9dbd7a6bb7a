"""Models for tests: BN statistics worth testing against, and tiny checkpoints in the published layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from schemas.checkpoint import MANIFEST_NAME, InputSpec
from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import export_checkpoint
from stripnet.network import build_model
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
