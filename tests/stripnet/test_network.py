"""The network: exact fusion of every block and of the whole chain, architectures as data, gray folding."""

import pytest
import torch
from torch import nn

from stripnet.architectures import EG_REPVGG, REPVGG_A0
from stripnet.layers import RepVGGBlock
from schemas.checkpoint import ArchitectureSpec, BlockSpec, InputSpec, Normalization
from stripnet.network import build_model, can_fold_gray, fold_gray, reparameterize

from tests.helpers.models import randomize_bn

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


def test_fold_gray_takes_one_plane_and_gives_the_same_logits():
    fused = reparameterize(randomize_bn(build_model(EG_REPVGG, 6), seed=2))
    spec = InputSpec()
    folded, gray = fold_gray(fused, spec)
    assert (gray.channels, gray.normalization.mean, gray.normalization.std) == (1, (0.5,), (0.25,))
    x = torch.randn(2, 1, 200, 200)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), fused(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=0)
    assert fused.blocks[0].reparam_conv.in_channels == 3  # a copy: the served model is untouched


def test_fold_gray_refuses_what_it_cannot_fold_exactly():
    fused = reparameterize(build_model(EG_REPVGG, 6))
    per_channel = InputSpec(normalization=Normalization(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)))
    assert can_fold_gray(InputSpec()) and not can_fold_gray(per_channel)
    with pytest.raises(ValueError, match="one mean and std"):
        fold_gray(fused, per_channel)
    with pytest.raises(ValueError, match="fused model"):
        fold_gray(build_model(EG_REPVGG, 6), InputSpec())
