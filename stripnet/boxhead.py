"""The localization head: where the defects are, as boxes, from the same forward pass as the class.

CenterNet (Zhou et al., "Objects as Points", 2019) on the classifier's own features. The head reads the
outputs of the blocks `BoxHeadSpec.layers`, finest first, each through its own 1×1 convolution; each
coarser map is brought to the finest's cells by nearest-centre indexing and they are summed. Feature cell
(i, j) of a stride-s map is centred on input pixel (s·j, s·i) (stripnet/cam.py), so fine cell i takes
coarse cell round(i·s_fine / s_coarse). One RepVGG block (fused for serving like the rest of the network)
and a 1×1 convolution then give C + 4 maps:

    a centre heat logit per class | the centre's offset from the cell (x, y, in cells) | log width, log height (cells)

A box centred at (cx, cy) of size (w, h) belongs to cell (round(cy / s), round(cx / s)).
Decoding (`decode`) takes the heat map of the class the classifier chose, its 3×3 local maxima above a
score, best first, and reads each one's box; the classifier's accuracy is untouched by the head.
The trainer (trainer/boxes.py) fits the head on a frozen, fused network; docs/locate.md has its scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from schemas.checkpoint import ArchitectureSpec, BoxHeadSpec
from schemas.messages import Box
from stripnet.layers import RepVGGBlock

REGRESSION_MAPS = 4  # offset x, offset y, log width, log height
HEAT_PRIOR = 0.1  # initial centre probability everywhere (CenterNet's −2.19 logit bias)


def block_strides(spec: ArchitectureSpec) -> tuple[int, ...]:
    """The stride of each block's output, in input pixels."""
    return tuple(math.prod(row.stride for row in spec.blocks[:i + 1]) for i in range(len(spec.blocks)))


class BoxHead(nn.Module):
    """Features of the blocks `spec.layers` → (N, C + 4, h, w) maps at the finest layer's cells.

    Each layer's map goes through its own 1×1 convolution to `hidden` channels at its own resolution (cheap on
    the coarse, wide maps), is brought to the finest cells and summed with the others (as in a feature pyramid),
    then one RepVGG block and the 1×1 output convolution."""

    def __init__(self, arch: ArchitectureSpec, num_classes: int, spec: BoxHeadSpec, *, deploy: bool = False) -> None:
        super().__init__()
        strides = block_strides(arch)
        self.spec, self.num_classes = spec, num_classes
        self.strides = tuple(strides[i] for i in spec.layers)
        if any(s < self.strides[0] for s in self.strides):
            raise ValueError(f"boxes.layers {spec.layers}: the first block must be the finest")
        self.laterals = nn.ModuleList(nn.Conv2d(arch.blocks[i].out_channels, spec.hidden, 1) for i in spec.layers)
        self.block = RepVGGBlock(spec.hidden, spec.hidden, 1, act=arch.activation, attention="none", deploy=deploy)
        self.out = nn.Conv2d(spec.hidden, num_classes + REGRESSION_MAPS, 1)
        with torch.no_grad():
            self.out.bias[:num_classes].fill_(math.log(HEAT_PRIOR / (1 - HEAT_PRIOR)))

    @property
    def stride(self) -> int:
        return self.strides[0]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        h, w = features[0].shape[-2:]
        x = self.laterals[0](features[0])
        for lateral, f, s in zip(self.laterals[1:], features[1:], self.strides[1:]):
            x = x + _to_cells(lateral(f), s // self.stride, h, w)
        return self.out(self.block(x))


def _to_cells(x: torch.Tensor, ratio: int, h: int, w: int) -> torch.Tensor:
    """Coarse map → (h, w) cells: fine cell i takes coarse cell round(i / ratio) (half up), kept in range."""
    def index(n: int, limit: int) -> torch.Tensor:
        return torch.div(2 * torch.arange(n, device=x.device) + ratio, 2 * ratio, rounding_mode="floor").clamp(
            max=limit - 1)
    return x.index_select(2, index(h, x.shape[2])).index_select(3, index(w, x.shape[3]))


@dataclass(frozen=True)
class Detections:
    """Per image: (k, 4) float corners x0, y0, x1, y1 in model-input pixels and (k,) scores, best first."""

    corners: tuple[np.ndarray, ...]
    scores: tuple[np.ndarray, ...]
    peaks: tuple[tuple[int, int], ...]  # (x, y) input pixel of the strongest centre cell, boxes or not


@torch.no_grad()
def decode(maps: torch.Tensor, classes: torch.Tensor, stride: int, input_size: int, *,
           score_threshold: float | Sequence[float], max_boxes: int, min_boxes: int = 0) -> Detections:
    """(N, C + 4, h, w) head maps and (N,) classes → the boxes of each image's class: its centre map's 3×3 local
    maxima at or above `score_threshold` (one value, or one per class), best first, at most `max_boxes`, and at
    least the `min_boxes` strongest maxima whatever their score."""
    maps = maps.float()
    n = torch.arange(len(classes), device=maps.device)
    heat = maps[n, classes].sigmoid()  # (N, h, w)
    floor = torch.as_tensor(score_threshold, dtype=heat.dtype, device=heat.device)
    floor = floor[classes] if floor.ndim else floor.expand(len(classes))  # (N,)
    maxima = heat == F.max_pool2d(heat[:, None], 3, 1, 1)[:, 0]
    width = heat.shape[-1]
    corners, scores, tops = [], [], []
    for k in range(len(classes)):
        top = int(heat[k].flatten().argmax())
        tops.append(((top % width) * stride, (top // width) * stride))
        rows, cols = torch.nonzero(maxima[k], as_tuple=True)
        strength = heat[k, rows, cols]
        above = int((strength >= floor[k]).sum())
        order = strength.argsort(descending=True)[:min(max(above, min_boxes), max_boxes)]
        rows, cols = rows[order], cols[order]
        box = (cell_boxes(maps[k, -REGRESSION_MAPS:, rows, cols], rows, cols) * stride).clamp(0, input_size)
        corners.append(box.cpu().numpy().astype(np.float64))
        scores.append(heat[k, rows, cols].cpu().numpy().astype(np.float64))
    return Detections(tuple(corners), tuple(scores), tuple(tops))


def cell_boxes(regression: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The (4, m) regression maps read at cells (rows, cols) → (m, 4) corners x0, y0, x1, y1, in cells."""
    cx, cy = cols + regression[0], rows + regression[1]
    half_w, half_h = regression[2].clamp(max=8).exp() / 2, regression[3].clamp(max=8).exp() / 2
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)


def to_frame_boxes(found: Detections, frame_sizes: Sequence[tuple[int, int]], input_size: int) -> tuple[tuple[Box, ...], ...]:
    """Input-pixel detections → the contract's boxes in each frame's own (height, width) pixels."""
    out = []
    for corners, scores, (height, width) in zip(found.corners, found.scores, frame_sizes, strict=True):
        sx, sy = width / input_size, height / input_size
        boxes = []
        for (x0, y0, x1, y1), score in zip(corners, scores):
            left, top = min(int(x0 * sx), width - 1), min(int(y0 * sy), height - 1)
            boxes.append(Box(x0=left, y0=top, x1=max(min(math.ceil(x1 * sx), width), left + 1),
                             y1=max(min(math.ceil(y1 * sy), height), top + 1), score=min(float(score), 1.0)))
        out.append(tuple(boxes))
    return tuple(out)
