"""Architectures as data. EG_REPVGG is the paper's Table 1; REPVGG_A0 is the teacher of Ding et al."""

from __future__ import annotations

from schemas.checkpoint import ArchitectureSpec, BlockSpec


def _b(out_channels: int, stride: int = 1) -> BlockSpec:
    return BlockSpec(out_channels=out_channels, stride=stride)


def stages(stem: int, depths: tuple[int, ...], widths: tuple[int, ...]) -> tuple[BlockSpec, ...]:
    """RepVGG layout: a stride-2 stem block, then stages whose first block halves the resolution."""
    rows = [_b(stem, 2)]
    for depth, width in zip(depths, widths, strict=True):
        rows += [_b(width, 2)] + [_b(width)] * (depth - 1)
    return tuple(rows)


EG_REPVGG = ArchitectureSpec(
    name="eg-repvgg",
    blocks=(
        _b(9, 2),   # D-RepVGGBlock1  100×100
        _b(9, 2),   # D-RepVGGBlock2   50×50
        _b(19, 2),  # D-RepVGGBlock3   25×25
        _b(19),     # S-RepVGGBlock1
        _b(38, 2),  # D-RepVGGBlock4   13×13
        _b(38),     # S-RepVGGBlock2
        _b(38),     # S-RepVGGBlock3
        _b(38),     # S-RepVGGBlock4
        _b(256, 2),  # D-RepVGGBlock5   7×7
    ),
    activation="gelu",
    attention="eca",
)

REPVGG_A0 = ArchitectureSpec(
    name="repvgg-a0",
    blocks=stages(stem=48, depths=(2, 4, 14, 1), widths=(48, 96, 192, 1280)),
    activation="relu",
    attention="none",
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {spec.name: spec for spec in (EG_REPVGG, REPVGG_A0)}


def get_spec(name: str) -> ArchitectureSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}") from None
