"""What a checkpoint may cost (`CheckpointLimits`), and what its network costs, computed from the
ArchitectureSpec alone: parameters, MACs and activations.

The checkpoint loader (stripnet/checkpoint.py) checks a manifest against these numbers and the limits
(`check_budget`) before it reads the weights or builds anything, so a manifest that declares a huge network
costs arithmetic, not memory. The formulas mirror stripnet.network and stripnet.layers:
tests/stripnet/test_budget.py compares them with `stripnet.profile` on built networks of random specs.
Imports pydantic and `schemas` only, so the inspector's settings can carry the limits without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from schemas.checkpoint import ArchitectureSpec, BoxHeadSpec, Manifest


class CheckpointError(ValueError):
    pass


class CheckpointLimits(BaseModel):
    """What a checkpoint may cost before anything is built from it (a watched model directory is untrusted
    input): `load_checkpoint` checks the files' sizes and the architecture's cost against these."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    max_manifest_bytes: int = Field(default=1 << 20, gt=0)
    """largest manifest.json read"""
    max_weights_bytes: int = Field(default=128 << 20, gt=0)
    """largest weights file read (the fused teacher, RepVGG-A0, is 28 MB)"""
    max_header_bytes: int = Field(default=1 << 20, gt=0)
    """largest safetensors header (its JSON list of tensors) read"""
    max_blocks: int = Field(default=64, gt=0)
    """most blocks an architecture may have (RepVGG-A0: 22, RepVGG-B3: 28)"""
    max_parameters: int = Field(default=20_000_000, gt=0)
    """most parameters (RepVGG-A0: 7.0 M, EG-RepVGG: 0.14 M)"""
    max_macs: int = Field(default=4_000_000_000, gt=0)
    """most multiply-accumulates per image (RepVGG-A0 at 200×200: 1.2 G, EG-RepVGG: 19 M)"""
    max_activation_bytes: int = Field(default=128 << 20, gt=0)
    """largest float32 input + output of one block for a batch of max_batch frames (RepVGG-A0, batch 32: 77 MB)"""


@dataclass(frozen=True)
class Cost:
    parameters: int  # as stripnet.profile.count_parameters counts them
    macs: int  # per image, as stripnet.profile.count_macs counts them: the convolutions and the head
    activation_elements: int  # per image: the largest input + output feature map of one block


def _block_parameters(in_ch: int, out_ch: int, stride: int, deploy: bool) -> int:
    if deploy:
        return out_ch * in_ch * 9 + out_ch  # one 3×3 convolution with a bias
    identity = 2 * out_ch if in_ch == out_ch and stride == 1 else 0  # the identity branch's BN
    return out_ch * in_ch * 9 + out_ch * in_ch + 4 * out_ch + identity  # 3×3 and 1×1 convolutions, each with a BN


def sides(spec: ArchitectureSpec, input_size: int) -> tuple[int, ...]:
    """The side of each block's output map (3×3, padding 1)."""
    out, side = [], input_size
    for row in spec.blocks:
        side = (side - 1) // row.stride + 1
        out.append(side)
    return tuple(out)


def cost(spec: ArchitectureSpec, num_classes: int, input_size: int, *, deploy: bool) -> Cost:
    """Parameters, per-image MACs and activations of the network on `input_size`² inputs, without building it."""
    eca = spec.eca_kernel_size if spec.attention == "eca" else 0
    taps = 9 if deploy else 9 + 1  # one fused 3×3, or a 3×3 and a 1×1 branch (the identity BN is element-wise)
    parameters, macs, activations, side, in_ch = 0, 0, 0, input_size, spec.in_channels
    for row, out_side in zip(spec.blocks, sides(spec, input_size), strict=True):
        parameters += _block_parameters(in_ch, row.out_channels, row.stride, deploy) + eca
        macs += out_side * out_side * row.out_channels * in_ch * taps
        activations = max(activations, in_ch * side * side + row.out_channels * out_side * out_side)
        side, in_ch = out_side, row.out_channels
    head = in_ch * num_classes
    return Cost(parameters=parameters + head + num_classes, macs=macs + head, activation_elements=activations)


def box_head_cost(spec: ArchitectureSpec, num_classes: int, head: BoxHeadSpec, input_size: int, *,
                  deploy: bool) -> Cost:
    """The localization head's (stripnet/boxhead.py) parameters, MACs and activations, as `cost` counts them."""
    side, hidden = sides(spec, input_size), head.hidden
    fine = side[head.layers[0]] ** 2
    outputs = num_classes + 4
    parameters = sum(spec.blocks[i].out_channels * hidden + hidden for i in head.layers)  # 1×1 laterals
    parameters += _block_parameters(hidden, hidden, 1, deploy) + hidden * outputs + outputs
    macs = sum(side[i] ** 2 * spec.blocks[i].out_channels * hidden for i in head.layers)
    macs += fine * hidden * hidden * (9 if deploy else 10) + fine * hidden * outputs
    return Cost(parameters=parameters, macs=macs, activation_elements=fine * (2 * hidden + outputs))


def check_budget(manifest: Manifest, limits: CheckpointLimits, batch: int = 1) -> Cost:
    """The architecture's cost, computed from the manifest alone; CheckpointError if it exceeds a limit."""
    spec, size = manifest.architecture, manifest.input.size
    if len(spec.blocks) > limits.max_blocks:
        raise CheckpointError(f"architecture has {len(spec.blocks):,} blocks > limit {limits.max_blocks:,}")
    if spec.in_channels != manifest.input.channels:
        raise CheckpointError(f"architecture takes {spec.in_channels} channels, the input {manifest.input.channels}")
    c = cost(spec, len(manifest.class_names), size, deploy=manifest.deploy)
    if manifest.boxes is not None:
        h = box_head_cost(spec, len(manifest.class_names), manifest.boxes, size, deploy=manifest.deploy)
        c = Cost(c.parameters + h.parameters, c.macs + h.macs, max(c.activation_elements, h.activation_elements))
    activation_bytes = c.activation_elements * batch * 4
    for what, value, limit in (("parameters", c.parameters, limits.max_parameters),
                               ("MACs per image", c.macs, limits.max_macs),
                               (f"activation bytes at batch {batch}", activation_bytes, limits.max_activation_bytes)):
        if value > limit:
            raise CheckpointError(f"architecture {spec.name!r:.80} on {size}×{size} inputs has {value:,} {what} "
                                  f"> limit {limit:,}")
    return c
