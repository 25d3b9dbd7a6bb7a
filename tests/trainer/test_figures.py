"""Figures: Grad-CAM against the exact CAM, and the plotting helper writes what it is given."""

import pytest
import torch

from stripnet.architectures import EG_REPVGG
from stripnet.cam import logits_and_cams
from stripnet.network import build_model, reparameterize
from trainer.figures import figure, grad_cam

from tests.helpers.models import randomize_bn


@pytest.fixture(scope="module")
def net():
    return randomize_bn(build_model(EG_REPVGG, 6)).eval()


@pytest.fixture(scope="module")
def fused(net):
    return reparameterize(net)


@pytest.mark.parametrize("form", ["training", "fused"])
def test_grad_cam_at_the_last_block_is_the_rectified_cam(net, fused, form):
    model = net if form == "training" else fused
    x = torch.randn(2, 3, 200, 200)
    maps, classes = grad_cam(model, x, model.blocks[-1])
    _, cam_classes, cams = logits_and_cams(fused, x)
    assert torch.equal(classes, cam_classes)
    torch.testing.assert_close(maps * 49, torch.relu(cams), rtol=1e-3, atol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_works_on_an_inner_layer(fused):
    maps, _ = grad_cam(fused, torch.randn(1, 3, 200, 200), fused.blocks[2], classes=torch.tensor([4]))
    assert maps.shape == (1, 25, 25) and (maps >= 0).all()


@pytest.mark.parametrize("palette", [False, True])
def test_figure_writes_a_png_and_closes_it(tmp_path, palette):
    import matplotlib.pyplot as plt

    path = tmp_path / "f.png"
    with figure(path, 1, 2, size=(3, 2), palette=palette) as (fig, (left, right)):
        left.plot([0, 1], [1, 0])
        right.imshow(torch.rand(8, 8).numpy())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    with pytest.raises(RuntimeError), figure(tmp_path / "never.png", size=(1, 1)):
        raise RuntimeError("drawing failed")
    assert not (tmp_path / "never.png").exists()
