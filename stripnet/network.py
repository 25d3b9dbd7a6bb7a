"""The network: a chain of RepVGG blocks read from an ArchitectureSpec, a pooling head, and the converters."""

from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from schemas.checkpoint import ArchitectureSpec, BoxHeadSpec, InputSpec, Normalization, OODSpec
from stripnet.boxhead import BoxHead
from stripnet.layers import RepVGGBlock
from stripnet.ood import Detector, channel_correlations, channel_stats, make_detector


@runtime_checkable
class Reparameterizable(Protocol):
    def reparameterize(self) -> None: ...


class ClassifierHead(nn.Module):
    """Global average pooling to 1×1, then a linear layer to the class logits."""

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_ch, num_classes)

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        """(N, K, h, w) feature map → (N, K) pooled features."""
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


class RepNet(nn.Module):
    """One definition for training (multi-branch) and inference (plain 3×3 chain, `deploy=True`). With `ood`,
    it carries an unknown detector on one block's channel statistics (stripnet/ood.py), with `boxes` a
    localization head on some blocks' outputs (stripnet/boxhead.py); both are fitted after training."""

    def __init__(self, spec: ArchitectureSpec, num_classes: int, *, deploy: bool = False,
                 ood: OODSpec | None = None, boxes: BoxHeadSpec | None = None) -> None:
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
        self.ood: Detector | None = (make_detector(ood, num_classes, [spec.blocks[i].out_channels for i in ood.blocks])
                                     if ood is not None else None)
        self.boxes: BoxHead | None = (BoxHead(spec, num_classes, boxes, deploy=deploy)
                                      if boxes is not None else None)

    @property
    def is_deploy(self) -> bool:
        return all(block.reparam_conv is not None for block in self.blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def forward_with_features(self, x: torch.Tensor, layers: tuple[int, ...], corr_layers: tuple[int, ...] = ()
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass → (logits (N, classes), the channel statistics of the outputs of the blocks `layers`: (N, 2C)
        each, then the channel correlations of the blocks `corr_layers`, side by side)."""
        return forward_with_stats(self.blocks, self.head, x, layers, corr_layers)


def forward_with_stats(blocks: nn.Sequential | list[nn.Module], head: ClassifierHead, x: torch.Tensor,
                       layers: tuple[int, ...], corr_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain of `blocks`, then `head`, keeping a detector's features (`stats_of`) on the way."""
    x, kept = run_chain(blocks, x, (*layers, *corr_layers))
    return head(x), stats_of(kept, layers, corr_layers)


def stats_of(kept: dict[int, torch.Tensor], layers: tuple[int, ...], corr_layers: tuple[int, ...] = ()
             ) -> torch.Tensor:
    """A detector's features: the channel statistics of the kept outputs of the blocks `layers`, then the
    channel correlations of those of `corr_layers`, side by side."""
    return torch.cat([*(channel_stats(kept[i]) for i in layers), *(channel_correlations(kept[i]) for i in corr_layers)],
                     dim=1)


def run_chain(blocks: nn.Sequential | list[nn.Module], x: torch.Tensor, keep: tuple[int, ...] = ()
              ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The chain's output, and the outputs of the blocks `keep` on the way."""
    kept = {}
    for i, block in enumerate(blocks):
        x = block(x)
        if i in keep:
            kept[i] = x
    if len(kept) != len(set(keep)):
        raise ValueError(f"block {min(set(keep) - kept.keys())} is not in a chain of {len(blocks)} blocks")
    return x, kept


def build_model(spec: ArchitectureSpec, num_classes: int, *, deploy: bool = False,
                ood: OODSpec | None = None, boxes: BoxHeadSpec | None = None) -> RepNet:
    return RepNet(spec, num_classes, deploy=deploy, ood=ood, boxes=boxes)


def reparameterize(model: nn.Module) -> nn.Module:
    """Return a fused copy in eval mode: every re-parameterizable module collapsed to its single conv."""
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, Reparameterizable):
            module.reparameterize()
    return fused


def can_fold_gray(spec: InputSpec) -> bool:
    """Gray replicated to C > 1 channels that share one mean and std: the first conv can take one channel."""
    norm = spec.normalization
    return spec.color == "gray" and spec.channels > 1 and len(set(norm.mean)) == 1 and len(set(norm.std)) == 1


def fold_gray(model: RepNet, spec: InputSpec) -> tuple[RepNet, InputSpec]:
    """A copy of the fused `model` that takes one gray plane instead of C replicated ones, and its input spec.

    Exact: a convolution is linear in its input and every replicated channel, zero padding included,
    holds the same values, so the first kernel summed over its input channels gives the same output."""
    if not can_fold_gray(spec):
        raise ValueError("fold_gray needs a gray input replicated to C > 1 channels with one mean and std; "
                         f"the input is {spec.color} with {spec.channels} channels, mean={spec.normalization.mean} "
                         f"std={spec.normalization.std}")
    folded = copy.deepcopy(model).eval()
    first = folded.blocks[0].reparam_conv
    if first is None or first.groups != 1 or first.in_channels != spec.channels:
        raise ValueError("fold_gray needs a fused model whose first convolution takes the input's channels")
    conv = nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride, first.padding,  # type: ignore[arg-type]
                     first.dilation, bias=first.bias is not None)  # type: ignore[arg-type]
    with torch.no_grad():
        conv.weight.copy_(first.weight.sum(dim=1, keepdim=True))
        if first.bias is not None:
            conv.bias.copy_(first.bias)  # type: ignore[union-attr]
    folded.blocks[0].reparam_conv = conv
    norm = spec.normalization
    gray = Normalization(mean=norm.mean[:1], std=norm.std[:1])
    return folded, spec.model_copy(update={"channels": 1, "normalization": gray})
