from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[3] / "shared"
NEU_CLS = SHARED / "datasets" / "neu-cls"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def neu_cls() -> Path:
    if not NEU_CLS.is_dir():
        pytest.skip(f"shared NEU-CLS images not found at {NEU_CLS}")
    return NEU_CLS


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine terms, so fusion is tested on real numbers."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model
