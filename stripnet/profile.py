"""Parameter and multiply-accumulate counts, per block and in total (the columns of Table 1).

MACs come from torch's own operator counter (`torch.utils.flop_counter.FlopCounterMode`): it counts
2 FLOPs per multiply-accumulate of a convolution or matrix product and nothing for element-wise work
(BN, activations, ECA's gate), which is how Table 1 counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from stripnet.network import run_chain


@dataclass(frozen=True)
class LayerRow:
    name: str
    output_size: tuple[int, int]
    out_channels: int
    parameters: int
    macs: int


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _forward_counting(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """module(x) and its multiply-accumulates per image (x holds one image)."""
    with FlopCounterMode(display=False) as counter:
        y = module(x)
    return y, counter.get_total_flops() // 2


@torch.no_grad()
def profile_rows(model: nn.Module, input_size: int, in_channels: int = 3) -> list[LayerRow]:
    """One row per child of `model.blocks`, then the head; MACs are per image."""
    rows: list[LayerRow] = []
    x = torch.zeros(1, in_channels, input_size, input_size)
    was_training = model.training
    model.eval()
    stages = [(f"block{i + 1}", blk) for i, blk in enumerate(model.blocks)] + [("head", model.head)]
    for name, module in stages:
        x, macs = _forward_counting(module, x)
        size = (x.shape[2], x.shape[3]) if x.dim() == 4 else (1, 1)
        rows.append(LayerRow(name, size, x.shape[1], count_parameters(module), macs))
    model.train(was_training)
    return rows


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    was_training = model.training
    model.eval()
    _, macs = _forward_counting(model, torch.zeros(1, in_channels, input_size, input_size))
    model.train(was_training)
    return macs


@torch.no_grad()
def count_head_macs(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates per image of the model's localization head alone (`model.boxes`), 0 without one."""
    if getattr(model, "boxes", None) is None:
        return 0
    was_training = model.training
    model.eval()
    layers = model.boxes.spec.layers
    _, kept = run_chain(model.blocks, torch.zeros(1, in_channels, input_size, input_size), layers)
    _, macs = _forward_counting(model.boxes, [kept[i] for i in layers])
    model.train(was_training)
    return macs
