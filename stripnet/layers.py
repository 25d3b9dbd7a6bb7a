"""Reusable layers: the re-parameterizable RepVGG block, ECA attention, and the layer factories."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def create_act(name: str) -> nn.Module:
    match name:
        case "gelu":
            return nn.GELU()
        case "relu":
            return nn.ReLU(inplace=True)
    raise ValueError(f"unknown activation {name!r}")


def create_attention(name: str, kernel_size: int) -> nn.Module:
    match name:
        case "eca":
            return ECA(kernel_size)
        case "none":
            return nn.Identity()
    raise ValueError(f"unknown attention {name!r}")


class ECA(nn.Module):
    """Efficient channel attention: a k-tap 1-D conv across the pooled channel vector, then a sigmoid gate."""

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3))  # (N, C)
        return x * torch.sigmoid(self._channel_conv(y))[:, :, None, None]

    def _channel_conv(self, y: torch.Tensor) -> torch.Tensor:
        """The k-tap conv across channels as k shifted multiply-adds: the same numbers as `self.conv`,
        without Conv1d's slow generic CPU path for a (1, 1, k) kernel (a quarter of batch-1 time)."""
        k = self.conv.kernel_size[0]
        padded = F.pad(y, (k // 2, k // 2))
        w = self.conv.weight.view(k)
        out = padded[:, :y.shape[1]] * w[0]
        for i in range(1, k):
            out = out + padded[:, i:i + y.shape[1]] * w[i]
        return out


class ConvBN(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)


class RepVGGBlock(nn.Module):
    """3×3 conv-BN + 1×1 conv-BN (+ identity BN when shapes allow), summed, then attention and activation.

    After `reparameterize()` the three branches are one 3×3 conv with bias; the block computes the
    same function in eval mode. `reparam_conv is None` marks the training form.
    """

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, *, act: str, attention: str, eca_kernel_size: int = 3,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        self.reparam_conv: nn.Conv2d | None = None
        if deploy:
            self.reparam_conv = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=True)
        else:
            self.conv_kxk = ConvBN(in_ch, out_ch, 3, stride)
            self.conv_1x1 = ConvBN(in_ch, out_ch, 1, stride)
            self.identity = nn.BatchNorm2d(out_ch) if in_ch == out_ch and stride == 1 else None
        self.attn = create_attention(attention, eca_kernel_size)
        self.act = create_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            y = self.reparam_conv(x)
        else:
            y = self.conv_kxk(x) + self.conv_1x1(x)
            if self.identity is not None:
                y = y + self.identity(x)
        return self.act(self.attn(y))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        kernel, bias = self._equivalent_kernel_bias()
        conv = nn.Conv2d(self.in_ch, self.out_ch, 3, self.stride, padding=1, bias=True)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        self.reparam_conv = conv.to(kernel.device)
        del self.conv_kxk, self.conv_1x1, self.identity

    def _equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        k3, b3 = _fuse_bn(self.conv_kxk.conv.weight, self.conv_kxk.bn)
        k1, b1 = _fuse_bn(self.conv_1x1.conv.weight, self.conv_1x1.bn)
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
        if self.identity is not None:
            kid, bid = _fuse_bn(_identity_kernel(self.in_ch, kernel), self.identity)
            kernel, bias = kernel + kid, bias + bid
        return kernel, bias


def _identity_kernel(channels: int, like: torch.Tensor) -> torch.Tensor:
    """A 3×3 kernel whose convolution returns its input: 1 at the centre of each channel's own tap."""
    kernel = torch.zeros(channels, channels, 3, 3, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels)
    kernel[idx, idx, 1, 1] = 1.0
    return kernel


def _fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(conv(x; W)) = conv(x; W·γ/σ) + (β − μ·γ/σ), with σ = sqrt(var + eps) (paper eq. 1–2)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale[:, None, None, None], bn.bias - bn.running_mean * scale
