import math

import numpy as np
import pytest
import torch

from stripnet.architectures import EG_REPVGG
from stripnet.network import build_model
from trainer.data import dihedral
from trainer.distill import FrozenTeacher, KDConfig, cache_dihedral_logits, kd_loss


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("t_squared", [False, True])
def test_kd_loss_matches_hand_computation(t_squared):
    z = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])  # student
    u = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 2.0]])  # teacher
    y = np.array([0, 2])
    t, alpha = 7.0, 0.3
    p_t, p_s = _softmax(u / t), _softmax(z / t)
    kl = float(np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)))
    ce = float(np.mean(-np.log(_softmax(z)[np.arange(2), y])))
    expected = alpha * kl * (t * t if t_squared else 1) + (1 - alpha) * ce

    out = kd_loss(torch.tensor(z), torch.tensor(u), torch.tensor(y), KDConfig(t, alpha, t_squared))
    assert math.isclose(out["loss"].item(), expected, rel_tol=1e-9)
    assert math.isclose(out["ce"].item(), ce, rel_tol=1e-9)


def test_teacher_stays_frozen_and_in_eval():
    teacher = FrozenTeacher(build_model(EG_REPVGG, 6))
    teacher.train()
    assert not teacher.teacher.training
    assert all(not m.training for m in teacher.teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    before = [b.clone() for b in teacher.teacher.buffers()]
    teacher(torch.randn(4, 3, 64, 64))
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.teacher.buffers()))  # BN stats untouched


def test_cached_logits_match_the_augmented_forward():
    teacher = FrozenTeacher(build_model(EG_REPVGG, 6))
    images = torch.randint(0, 255, (5, 32, 32), dtype=torch.uint8)
    prep = lambda x: x.unsqueeze(1).float().div(255).expand(-1, 3, -1, -1)  # noqa: E731
    cache = cache_dihedral_logits(teacher, images, prep, batch_size=2)
    assert cache.shape == (8, 5, 6)
    for k in (0, 3, 6):
        torch.testing.assert_close(cache[k], teacher(prep(dihedral(images, k))))
