"""Parameter and multiply-accumulate counts, per block and in total (the columns of Table 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerRow:
    name: str
    output_size: tuple[int, int]
    out_channels: int
    parameters: int
    macs: int


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _macs_hook(counter: list[int]):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d | nn.Conv1d):
            per_output = module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
            counter[0] += output.numel() // output.shape[0] * per_output
        elif isinstance(module, nn.Linear):
            counter[0] += output.numel() // output.shape[0] * module.in_features
    return hook


@torch.no_grad()
def profile_rows(model: nn.Module, input_size: int, in_channels: int = 3) -> list[LayerRow]:
    """One row per child of `model.blocks`, then the head; MACs are per image."""
    rows: list[LayerRow] = []
    x = torch.zeros(1, in_channels, input_size, input_size)
    was_training = model.training
    model.eval()
    stages = [(f"block{i + 1}", blk) for i, blk in enumerate(model.blocks)] + [("head", model.head)]
    for name, module in stages:
        counter = [0]
        handles = [m.register_forward_hook(_macs_hook(counter)) for m in module.modules()]
        x = module(x)
        for h in handles:
            h.remove()
        size = (x.shape[2], x.shape[3]) if x.dim() == 4 else (1, 1)
        rows.append(LayerRow(name, size, x.shape[1], count_parameters(module), counter[0]))
    model.train(was_training)
    return rows


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int, in_channels: int = 3) -> int:
    counter = [0]
    handles = [m.register_forward_hook(_macs_hook(counter)) for m in model.modules()]
    was_training = model.training
    model.eval()
    model(torch.zeros(1, in_channels, input_size, input_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return counter[0]
