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

