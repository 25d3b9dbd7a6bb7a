"""The network: a chain of RepVGG blocks read from an ArchitectureSpec, a pooling head, and the converter."""

from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from schemas.checkpoint import ArchitectureSpec
from trainer.nets.blocks import RepVGGBlock


@runtime_checkable
class Reparameterizable(Protocol):
    def reparameterize(self) -> None: ...


class ClassifierHead(nn.Module):
    """Global average pooling to 1×1, then a linear layer to the class logits."""

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class RepNet(nn.Module):
    """One definition for training (multi-branch) and inference (plain 3×3 chain, `deploy=True`)."""

    def __init__(self, spec: ArchitectureSpec, num_classes: int, *, deploy: bool = False) -> None:
        super().__init__()
        self.spec, self.num_classes = spec, num_classes
        blocks, in_ch = [], spec.in_channels
        for row in spec.blocks:
            blocks.append(RepVGGBlock(
                in_ch, row.out_channels, row.stride, act=spec.activation, attention=spec.attention,
                eca_kernel_size=spec.eca_kernel_size, deploy=deploy,
            ))
            in_ch = row.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = ClassifierHead(in_ch, num_classes)

    @property
    def is_deploy(self) -> bool:
        return all(block.reparam_conv is not None for block in self.blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def build_model(spec: ArchitectureSpec, num_classes: int, *, deploy: bool = False) -> RepNet:
    return RepNet(spec, num_classes, deploy=deploy)


def reparameterize(model: nn.Module) -> nn.Module:
    """Return a fused copy in eval mode: every re-parameterizable module collapsed to its single conv."""
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, Reparameterizable):
            module.reparameterize()
    return fused
