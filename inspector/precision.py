"""Reduced precision on the CPU: the accuracy gate a bf16 model must pass at load.

Which CPUs have bf16 is `stripnet.bf16.cpu_flags` and `has_bf16`, shared with the trainer (its bf16
autocast default).

The gate: a reduced-precision runner is accepted for a model only when, on a reference batch, every
argmax agrees with the fp32 runner's and no class probability differs by more than `MAX_PROB_DIFF`.
The reference batch is synthetic and deterministic: frames made from the checkpoint's own input
spec (its size), so every checkpoint, whoever exported it, carries one. They are steel-like textures
(smooth shading, grain, dark and bright streaks and blobs) rather than plain noise, so the model sees
inputs of the kind it was trained on and its outputs are not all near-ties.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from schemas.checkpoint import InputSpec

MAX_PROB_DIFF = 1e-2
REFERENCE_FRAMES = 32
REFERENCE_SEED = 14

@dataclass(frozen=True)
class GateResult:
    accepted: bool
    frames: int
    argmax_disagreements: int
    max_prob_diff: float

    def describe(self) -> str:
        return (f"{self.frames - self.argmax_disagreements}/{self.frames} argmax agree, largest probability "
                f"difference {self.max_prob_diff:.2e} (limit {MAX_PROB_DIFF:g})")


def compare(reduced: np.ndarray, full: np.ndarray) -> GateResult:
    """Reduced-precision probabilities against fp32 ones for the same frames, (N, classes) each."""
    disagree = int((reduced.argmax(axis=1) != full.argmax(axis=1)).sum())
    diff = float(np.abs(reduced.astype(np.float64) - full).max()) if len(full) else 0.0
    return GateResult(accepted=disagree == 0 and diff <= MAX_PROB_DIFF, frames=len(full),
                      argmax_disagreements=disagree, max_prob_diff=diff)


def reference_frames(spec: InputSpec, count: int = REFERENCE_FRAMES, seed: int = REFERENCE_SEED) -> list[np.ndarray]:
    """`count` deterministic (size, size) uint8 gray frames of steel-like texture."""
    rng = np.random.default_rng(seed)
    return [_texture(rng, spec.size) for _ in range(count)]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(70, 190, (rng.integers(2, 12), rng.integers(2, 12))).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, rng.uniform(2, 20), (size, size)).astype(np.float32)  # grain
    for _ in range(rng.integers(0, 6)):  # streaks (scratch- and scale-like)
        p, q = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(image, tuple(map(int, p)), tuple(map(int, q)), float(rng.uniform(20, 235)),
                 int(rng.integers(1, 5)))
    for _ in range(rng.integers(0, 6)):  # blobs (patch- and inclusion-like)
        centre, axes = rng.integers(0, size, 2), rng.integers(2, max(3, size // 6), 2)
        cv2.ellipse(image, tuple(map(int, centre)), tuple(map(int, axes)), float(rng.uniform(0, 180)), 0, 360,
                    float(rng.uniform(20, 235)), -1)
    image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.5, 2.0)))
    return np.clip(image, 0, 255).astype(np.uint8)


def gate(reduced: Callable[[Sequence[np.ndarray]], np.ndarray], full: Callable[[Sequence[np.ndarray]], np.ndarray],
         frames: Sequence[np.ndarray], max_batch: int) -> GateResult:
    """Run `frames` through both (probabilities per batch of at most `max_batch`) and compare."""
    batches = [frames[i:i + max_batch] for i in range(0, len(frames), max_batch)]
    return compare(np.concatenate([reduced(b) for b in batches]), np.concatenate([full(b) for b in batches]))
