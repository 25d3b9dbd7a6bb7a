"""The bf16 form of a fused RepNet that the CPU bf16 runner serves: each block's convolution after the first one
in bfloat16, everything else (the first block, attention, activation, head) in fp32. Why this split, and not
autocast on the whole network: inspector/runners.py (Bf16Runner) and benchmarks/model.py, which measures both.

`cpu_flags()` reads the feature flags the kernel reports (/proc/cpuinfo), falling back to torch's own probe where
there is no /proc; `has_bf16(flags)` says whether they include bf16 dot-product instructions (AVX512-BF16 or
AMX-BF16), which is what makes bf16 faster than fp32 rather than emulated. The inspector picks its backend by it,
the trainer its autocast default."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from stripnet.layers import RepVGGBlock
from stripnet.network import RepNet, forward_with_stats

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")

CpuFlags = Callable[[], frozenset[str]]


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo; torch's probe where that is unreadable."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    probes = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported, "amx_bf16": torch.cpu._is_amx_tile_supported}
    return frozenset(flag for flag, probe in probes.items() if probe())


def has_bf16(flags: frozenset[str]) -> bool:
    return not BF16_FLAGS.isdisjoint(flags)


def cpu_has_bf16() -> bool:
    return has_bf16(cpu_flags())


class Bf16Net(nn.Module):
    """A fused RepNet with the convolutions after the first one in bf16 (bf16 in, fp32 accumulation, bf16 out
    converted back to fp32); the caller's model is not modified (the bf16 weights are copies). It has a
    RepNet's `forward` and `forward_with_features`, so stripnet.ood.scored wraps it like the fp32 network."""

    def __init__(self, net: RepNet) -> None:
        super().__init__()
        if not net.is_deploy:
            raise ValueError("Bf16Net takes a fused model; reparameterize the model first")
        self.stem, self.head = net.blocks[0], net.head
        self.body = nn.Sequential(*[_Bf16ConvBlock(block) for block in net.blocks[1:]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))

    def forward_with_features(self, x: torch.Tensor, layers: tuple[int, ...], corr_layers: tuple[int, ...] = ()
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_with_stats([self.stem, *self.body], self.head, x, layers, corr_layers)


class _Bf16ConvBlock(nn.Module):
    """A fused RepVGGBlock whose convolution runs in bf16; its attention and activation stay in fp32."""

    def __init__(self, block: RepVGGBlock) -> None:
        super().__init__()
        self.conv = copy.deepcopy(block.reparam_conv).to(torch.bfloat16)
        self.attn, self.act = block.attn, block.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.attn(self.conv(x.to(torch.bfloat16)).float()))
