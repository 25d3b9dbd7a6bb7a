import pytest
import torch
from torch import nn

from schemas.checkpoint import ArchitectureSpec, BlockSpec
from stripnet.architectures import EG_REPVGG, REPVGG_A0
from stripnet.layers import RepVGGBlock
from stripnet.network import build_model, reparameterize
from stripnet.profile import count_parameters, profile_rows

from tests.helpers.models import randomize_bn

TABLE1_TRAIN = [309, 849, 1789, 3727, 7375, 14671, 14671, 14671, 98307, 1542]
TABLE1_FUSED = [252, 738, 1558, 3268, 6536, 13034, 13034, 13034, 87808, 1542]  # without the 3 ECA weights
TABLE1_SIZES = [100, 50, 25, 25, 13, 13, 13, 13, 7, 1]
TABLE1_CHANNELS = [9, 9, 19, 19, 38, 38, 38, 38, 256, 6]


def test_table1_training_rows():
    rows = profile_rows(build_model(EG_REPVGG, 6), 200)
    assert [r.parameters for r in rows] == TABLE1_TRAIN
    assert [r.output_size[0] for r in rows] == TABLE1_SIZES
    assert [r.out_channels for r in rows] == TABLE1_CHANNELS
    assert sum(TABLE1_TRAIN) == 157_911


def test_table1_fused_rows():
    rows = profile_rows(reparameterize(build_model(EG_REPVGG, 6)), 200)
    eca = [3] * 9 + [0]
    assert [r.parameters - e for r, e in zip(rows, eca)] == TABLE1_FUSED
    assert sum(r.parameters for r in rows) == 140_804 + 27


def test_teacher_is_repvgg_a0_size():
    fused = reparameterize(build_model(REPVGG_A0, 6))
    assert count_parameters(fused) == pytest.approx(7.04e6, rel=0.005)
    widths = [b.out_channels for b in REPVGG_A0.blocks]
    assert widths.count(48) == 3 and widths.count(96) == 4 and widths.count(192) == 14 and widths[-1] == 1280


@pytest.mark.parametrize("in_ch,out_ch,stride", [(8, 8, 1), (8, 16, 1), (8, 8, 2), (3, 9, 2)])
@pytest.mark.parametrize("act,attention", [("gelu", "eca"), ("relu", "none")])
def test_block_fusion_is_exact(in_ch, out_ch, stride, act, attention):
    block = randomize_bn(RepVGGBlock(in_ch, out_ch, stride, act=act, attention=attention)).eval()
    assert (block.identity is not None) == (in_ch == out_ch and stride == 1)
    x = torch.randn(2, in_ch, 17, 17)
    expected = block(x)
    block.reparameterize()
    block.reparameterize()  # idempotent
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())


@pytest.mark.parametrize("spec,size", [(EG_REPVGG, 200), (REPVGG_A0, 64)])
def test_network_fusion_is_exact(spec, size):
    model = randomize_bn(build_model(spec, 6), seed=1).eval()
    x = torch.randn(2, 3, size, size)
    fused = reparameterize(model)
    assert fused.is_deploy and not model.is_deploy  # a copy: the training model is untouched
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(spec.blocks) and all(c.kernel_size == (3, 3) for c in convs)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max().item() <= 1e-5


def test_deploy_build_loads_fused_weights():
    fused = reparameterize(randomize_bn(build_model(EG_REPVGG, 4)))
    deploy = build_model(EG_REPVGG, 4, deploy=True)
    deploy.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(1, 3, 200, 200)
    with torch.no_grad():
        torch.testing.assert_close(deploy.eval()(x), fused(x))


def test_spec_is_data():
    spec = ArchitectureSpec(name="tiny", blocks=(BlockSpec(out_channels=4, stride=2),), activation="relu",
                            attention="eca")
    model = build_model(spec, 3)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 3)


@pytest.mark.parametrize("k", [3, 5])
def test_eca_channel_conv_equals_conv1d(k):
    from stripnet.layers import ECA

    eca = ECA(k)
    y = torch.randn(4, 19)
    torch.testing.assert_close(eca._channel_conv(y), eca.conv(y.unsqueeze(1)).squeeze(1))
