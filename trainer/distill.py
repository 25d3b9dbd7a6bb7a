"""Knowledge distillation (paper §2.4, eq. 11–13) and the frozen teacher that feeds it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import DIHEDRAL, dihedral


@dataclass(frozen=True)
class KDConfig:
    temperature: Annotated[float, "softmax temperature T of the distillation term"] = 7.0
    alpha: Annotated[float, "weight α of the distillation term; 1 − α weighs the cross-entropy"] = 0.3
    t_squared: Annotated[bool, "scale the distillation term by T² (Hinton et al.); the paper's eq. 11 does not"] = False


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, cfg: KDConfig,
    label_smoothing: float = 0.0, class_weight: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """loss = α·KL(q(u,T) ‖ q(z,T)) + (1−α)·CE(y, q(z,1)); returns every component for logging.

    `class_weight` weighs the CE term per class (class-balanced loss); the teacher's term stays unweighted."""
    t = cfg.temperature
    kd = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean", log_target=True,
    )
    if cfg.t_squared:
        kd = kd * t * t
    ce = F.cross_entropy(student_logits, targets, weight=class_weight, label_smoothing=label_smoothing)
    return {"loss": cfg.alpha * kd + (1 - cfg.alpha) * ce, "kd": kd.detach(), "ce": ce.detach()}


class FrozenTeacher(nn.Module):
    """Wraps a teacher so it can neither learn nor drift: no gradients, and eval mode whatever `.train()` says."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(mode)
        self.teacher.eval()  # BN statistics must stay those the teacher was trained with
        return self

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)


@torch.inference_mode()
def cache_dihedral_logits(
    teacher: FrozenTeacher, images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 64,
) -> torch.Tensor:
    """Teacher logits for every D4 variant of every uint8 image: (8, N, classes).

    The student then distills from the exact teacher output for the very augmentation it sees,
    at the cost of 8 teacher passes over the training set once, instead of one pass per epoch.
    """
    from tqdm import tqdm  # the `train` extra

    variants = []
    for k in tqdm(range(DIHEDRAL), desc="teacher logits", unit="variant"):
        chunks = [
            teacher(prepare(dihedral(images[i:i + batch_size], k))) for i in range(0, len(images), batch_size)
        ]
        variants.append(torch.cat(chunks))
    return torch.stack(variants)
