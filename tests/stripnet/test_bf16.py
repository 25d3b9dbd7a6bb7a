"""The bf16 serving form (close to the fp32 network, the same logits by either forward, the caller's model untouched), and
which CPUs have bf16."""

from pathlib import Path

import pytest
import torch

from stripnet.architectures import EG_REPVGG
from stripnet.bf16 import Bf16Net, cpu_flags, has_bf16
from stripnet.network import build_model, reparameterize

from tests.helpers.models import randomize_bn


@pytest.fixture(scope="module")
def fused():
    return reparameterize(randomize_bn(build_model(EG_REPVGG, 6), seed=1))


def test_bf16_form_is_close_to_fp32_and_leaves_the_model_untouched(fused):
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = fused(x)
        net = Bf16Net(fused)
        logits = net(x)
        logits_too, stats = net.forward_with_features(x, (2,))
        torch.testing.assert_close(fused(x), expected, atol=0, rtol=0)
    assert logits.dtype == torch.float32 and stats.shape == (4, 2 * EG_REPVGG.blocks[2].out_channels)
    torch.testing.assert_close(logits, expected, atol=1e-2, rtol=0)
    torch.testing.assert_close(logits_too, logits, atol=0, rtol=0)


def test_bf16_form_refuses_an_unfused_model():
    with pytest.raises(ValueError, match="fused"):
        Bf16Net(build_model(EG_REPVGG, 6))


def test_cpu_flags_come_from_the_first_processor_in_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == frozenset({"fpu", "sse2", "avx512f", "avx512_bf16"})
    assert isinstance(cpu_flags(tmp_path / "missing"), frozenset)  # torch's probe instead


def test_has_bf16_needs_a_bf16_dot_product_flag() -> None:
    assert has_bf16(frozenset({"avx512f", "avx512_bf16"})) and has_bf16(frozenset({"amx_bf16"}))
    assert not has_bf16(frozenset({"avx512f", "avx2"}))
