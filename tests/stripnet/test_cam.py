"""Class-activation maps and boxes: exact CAM from the forward pass, boxes placed on the frame by the stride."""

import numpy as np
import pytest
import torch

from stripnet.architectures import EG_REPVGG
from stripnet.cam import (
    LocateConfig, boxes_from_map, feature_stride, locate_batch, logits_and_cams, normalize_cam, upsample_cam,
)
from stripnet.network import build_model, reparameterize


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = build_model(EG_REPVGG, 6)
    for m in model.modules():  # non-trivial BN statistics, so the fused network is not near-identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def fused(net):
    return reparameterize(net)


def test_cam_is_the_classifier_weighted_feature_sum_and_averages_to_the_logit(fused):
    x = torch.randn(3, 3, 200, 200)
    logits, classes, cams = logits_and_cams(fused, x)
    with torch.inference_mode():
        features = fused.forward_features(x)
        reference = fused(x)
    w, b = fused.head.fc.weight.detach(), fused.head.fc.bias.detach()
    explicit = torch.stack([
        sum(w[c, k] * features[n, k] for k in range(features.shape[1])) for n, c in enumerate(classes.tolist())
    ])
    assert cams.shape == (3, 7, 7)
    torch.testing.assert_close(cams, explicit, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, reference)
    assert torch.equal(classes, reference.argmax(1))
    torch.testing.assert_close(cams.mean(dim=(1, 2)) + b[classes], logits.gather(1, classes[:, None])[:, 0])


def test_one_hot_feature_cell_gives_one_box_around_its_receptive_centre():
    cam = np.zeros((7, 7), np.float32)
    cam[2, 4] = 3.0  # row 2, column 4: centred on input pixel (x=128, y=64) at stride 32
    heat = upsample_cam(normalize_cam(cam), 32, (200, 200), 200)
    assert np.unravel_index(heat.argmax(), heat.shape) == (64, 128)
    (box,) = boxes_from_map(heat, LocateConfig(threshold=0.5, step=1))
    # bilinear falls to half at ±16 px from the centre
    assert abs(box.x0 - 112) <= 1 and abs(box.x1 - 145) <= 1
    assert abs(box.y0 - 48) <= 1 and abs(box.y1 - 81) <= 1
    assert 0.5 <= box.score <= 1.0


def test_coarser_step_snaps_the_box_to_its_grid():
    cam = np.zeros((7, 7), np.float32)
    cam[2, 4] = 1.0
    heat = upsample_cam(cam, 32, (200, 200), 200, step=4)
    assert heat.shape == (50, 50)
    (box,) = boxes_from_map(heat, LocateConfig(step=4), (200, 200))
    assert all(v % 4 == 0 for v in (box.x0, box.y0, box.x1, box.y1))
    assert abs(box.x0 - 112) <= 4 and abs(box.x1 - 145) <= 4 and abs(box.y0 - 48) <= 4 and abs(box.y1 - 81) <= 4
    cam[6, 6] = 1.0  # a box touching the edge is clipped to the frame
    edge = boxes_from_map(upsample_cam(cam, 32, (198, 198), 200, step=4), LocateConfig(step=4), (198, 198))
    assert max(b.x1 for b in edge) == 198 and max(b.y1 for b in edge) == 198


def test_frame_of_another_size_scales_the_box():
    cam = np.zeros((7, 7), np.float32)
    cam[2, 4] = 1.0
    heat = upsample_cam(cam, 32, (300, 400), 200)  # (height, width): x scaled by 2, y by 1.5
    (box,) = boxes_from_map(heat, LocateConfig(step=1))
    assert heat.shape == (300, 400)
    assert box.x0 <= 256 < box.x1 and box.y0 <= 96 < box.y1


def test_separate_hot_regions_give_separate_boxes_best_first():
    heat = np.zeros((100, 100), np.float32)
    heat[10:20, 10:30] = 0.6
    heat[60:90, 50:70] = 1.0
    boxes = boxes_from_map(heat, LocateConfig(threshold=0.5, step=1))
    assert [(b.x0, b.y0, b.x1, b.y1) for b in boxes] == [(50, 60, 70, 90), (10, 10, 30, 20)]
    assert boxes[0].score == pytest.approx(1.0) and boxes[1].score == pytest.approx(0.6)
    assert len(boxes_from_map(heat, LocateConfig(threshold=0.7, step=1))) == 1
    assert len(boxes_from_map(heat, LocateConfig(min_area=0.03, step=1))) == 1
    assert boxes_from_map(np.zeros((10, 10), np.float32)) == ()


def test_locate_batch_returns_logits_and_boxes_inside_each_frame(fused):
    x = torch.randn(2, 3, 200, 200)
    out = locate_batch(fused, x, frame_sizes=[(200, 200), (120, 480)])
    assert out.boxes == locate_batch(fused, x, LocateConfig(step=4), [(200, 200), (120, 480)]).boxes  # the default
    with torch.inference_mode():
        torch.testing.assert_close(out.logits, fused(x))
    assert feature_stride(fused) == 32
    assert len(out.boxes) == 2 and all(out.boxes)
    for boxes, (h, w) in zip(out.boxes, [(200, 200), (120, 480)]):
        for b in boxes:
            assert 0 <= b.x0 < b.x1 <= w and 0 <= b.y0 < b.y1 <= h
    with pytest.raises(ValueError):
        locate_batch(fused, x, frame_sizes=[(200, 200)])


def test_the_model_package_pulls_in_no_training_serving_or_plotting_code():
    import subprocess
    import sys

    code = ("import sys, stripnet.bundled, stripnet.cam, stripnet.checkpoint, stripnet.preprocess; bad = [m for m "
            "in sys.modules if m.startswith(('trainer', 'inspector', 'matplotlib', 'torchvision'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

