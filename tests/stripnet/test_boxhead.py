"""The localization head: fused exactly with the rest, saved and checked with the checkpoint, decoded into the
contract's boxes where its maps say."""

import json
import math

import numpy as np
import pytest
import torch

from schemas.checkpoint import BoxHeadSpec
from stripnet.architectures import EG_REPVGG
from stripnet.boxhead import BoxHead, block_strides, decode, to_frame_boxes
from stripnet.cam import LocateConfig, locate_batch, one_pass
from stripnet.checkpoint import CheckpointError, export_checkpoint, load_checkpoint, read_manifest
from stripnet.network import build_model, reparameterize
from tests.helpers.models import head_spec, randomize_bn, with_random_head


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return with_random_head(randomize_bn(build_model(EG_REPVGG, 6)).eval())


def test_strides_are_the_products_of_the_block_strides():
    assert block_strides(EG_REPVGG) == (2, 4, 8, 8, 16, 16, 16, 16, 32)


def test_fused_head_computes_what_the_training_form_computes(net):
    x = torch.randn(2, 3, 200, 200)
    fused = reparameterize(net)
    assert fused.boxes.block.reparam_conv is not None and net.boxes.block.reparam_conv is None
    with torch.inference_mode():
        before, after = one_pass(net, x), one_pass(fused, x)
    assert before.box_maps.shape == (2, 6 + 4, 25, 25)  # the finest layer (block 3) is stride 8
    torch.testing.assert_close(after.box_maps, before.box_maps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-4, atol=1e-4)


def test_coarse_maps_reach_the_fine_cells_by_nearest_centre():
    head = BoxHead(EG_REPVGG, 2, head_spec(layers=(3, 8), hidden=1))
    with torch.no_grad():
        for lateral in head.laterals:  # identity-like laterals: channel 0 passes through, nothing else
            lateral.weight.zero_(), lateral.bias.zero_()
            lateral.weight[0, 0] = 1.0
    head.block = torch.nn.Identity()
    head.out = torch.nn.Identity()
    fine = torch.zeros(1, 19, 25, 25)
    coarse = torch.arange(49, dtype=torch.float32).reshape(1, 1, 7, 7).expand(1, 256, 7, 7).clone()
    got = head([fine, coarse])[0, 0]
    seen = got[0, :].tolist()  # fine cell j (centre 8j) takes coarse cell round(j / 4) (centre 32·that)
    assert seen == [min((j + 2) // 4, 6) for j in range(25)]  # halves round up: cell 2 (16 px) → 1 (32 px)


def _maps(classes: int, cells: int, at: tuple[int, int], cls: int, reg: tuple[float, float, float, float],
          peak: float = 0.9) -> torch.Tensor:
    maps = torch.full((1, classes + 4, cells, cells), -10.0)
    i, j = at
    maps[0, cls, i, j] = math.log(peak / (1 - peak))
    maps[0, classes:, i, j] = torch.tensor(reg)
    return maps


def test_a_centre_decodes_to_its_box_in_input_and_frame_pixels():
    # cell (row 10, col 5) at stride 8, offset (0.5, -0.25) cells, 4 × 2 cells: centre (44, 78), 32 × 16 px
    maps = _maps(3, 25, (10, 5), 1, (0.5, -0.25, math.log(4), math.log(2)))
    found = decode(maps, torch.tensor([1]), 8, 200, score_threshold=0.3, max_boxes=8)
    np.testing.assert_allclose(found.corners[0], [[28, 70, 60, 86]], atol=1e-4)
    np.testing.assert_allclose(found.scores[0], [0.9], atol=1e-6)
    assert found.peaks == ((40, 80),)
    (boxes,) = to_frame_boxes(found, [(400, 100)], 200)  # frame 100 wide, 400 high
    assert [(b.x0, b.y0, b.x1, b.y1) for b in boxes] == [(14, 140, 30, 172)]


def test_only_the_chosen_class_and_centres_above_the_threshold_become_boxes():
    maps = _maps(3, 25, (10, 5), 1, (0, 0, 0, 0))
    assert len(decode(maps, torch.tensor([0]), 8, 200, score_threshold=0.3, max_boxes=8).corners[0]) == 0
    assert len(decode(maps, torch.tensor([1]), 8, 200, score_threshold=0.95, max_boxes=8).corners[0]) == 0


def test_per_class_thresholds_apply_to_the_class_the_classifier_chose():
    maps = torch.cat([_maps(2, 25, (10, 5), 0, (0, 0, 0, 0), peak=0.4), _maps(2, 25, (10, 5), 1, (0, 0, 0, 0), peak=0.4)])
    found = decode(maps, torch.tensor([0, 1]), 8, 200, score_threshold=(0.5, 0.3), max_boxes=8)
    assert [len(c) for c in found.corners] == [0, 1]


def test_boxes_are_clipped_to_the_frame_and_never_empty():
    maps = _maps(2, 25, (0, 24), 0, (0.4, -0.4, math.log(100), math.log(0.001)))
    found = decode(maps, torch.tensor([0]), 8, 200, score_threshold=0.3, max_boxes=8)
    (boxes,) = to_frame_boxes(found, [(200, 200)], 200)
    (box,) = boxes
    assert 0 <= box.x0 < box.x1 <= 200 and 0 <= box.y0 < box.y1 <= 200


def test_local_maxima_only_best_first_and_at_most_max_boxes():
    maps = _maps(1, 25, (3, 3), 0, (0, 0, 0, 0), peak=0.6)
    maps[0, 0, 3, 4] = math.log(0.5 / 0.5)  # a weaker neighbour of the peak: suppressed
    maps[0, 0, 20, 20] = math.log(0.8 / 0.2)
    found = decode(maps, torch.tensor([0]), 8, 200, score_threshold=0.3, max_boxes=8)
    np.testing.assert_allclose(found.scores[0], [0.8, 0.6], atol=1e-6)
    assert len(decode(maps, torch.tensor([0]), 8, 200, score_threshold=0.3, max_boxes=1).scores[0]) == 1


def test_min_boxes_serves_the_strongest_centres_below_the_threshold_only_to_make_up_the_number():
    maps = _maps(1, 25, (3, 3), 0, (0, 0, 0, 0), peak=0.2)
    maps[0, 0, 20, 20] = math.log(0.1 / 0.9)
    maps[0, 0, 12, 12] = math.log(0.7 / 0.3)
    def scores(threshold, min_boxes, max_boxes=8):
        found = decode(maps, torch.tensor([0]), 8, 200, score_threshold=threshold, max_boxes=max_boxes,
                       min_boxes=min_boxes)
        return found.scores[0].round(6).tolist()
    assert scores(0.3, 0) == [0.7]
    assert scores(0.3, 1) == [0.7]  # one above the threshold already: nothing below it added
    assert scores(0.3, 2) == [0.7, 0.2]
    assert scores(0.9, 1) == [0.7]
    assert scores(0.9, 2, max_boxes=1) == [0.7]  # max_boxes still caps it
    assert len(scores(0.3, 64)) == len(scores(1e-6, 0))  # no more than the local maxima there are


def test_checkpoint_saves_the_head_and_locate_serves_its_boxes(net, tmp_path):
    manifest = export_checkpoint(net, tmp_path / "ckpt", class_names=tuple("abcdef"), model_name="t",
                                 model_version="v1")
    assert manifest.boxes == net.boxes.spec
    model, loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.boxes == net.boxes.spec and model.boxes is not None and model.boxes.block.reparam_conv is not None
    x = torch.randn(2, 3, 200, 200)
    head = locate_batch(model, x, LocateConfig(), [(200, 200), (100, 300)])
    cam = locate_batch(model, x, LocateConfig(method="cam"), [(200, 200), (100, 300)])
    with torch.inference_mode():
        found = one_pass(model, x)
    spec = model.boxes.spec
    expected = to_frame_boxes(decode(found.box_maps, found.classes, 8, 200, score_threshold=spec.score_threshold,
                                     max_boxes=spec.max_boxes), [(200, 200), (100, 300)], 200)
    assert head.boxes == expected and any(head.boxes) and head.boxes != cam.boxes
    torch.testing.assert_close(head.logits, cam.logits)


def test_a_model_without_a_head_refuses_head_boxes_and_gets_cam_boxes_by_default():
    model = reparameterize(build_model(EG_REPVGG, 6))
    x = torch.randn(1, 3, 200, 200)
    with pytest.raises(ValueError, match="no localization head"):
        locate_batch(model, x, LocateConfig(method="head"))
    assert locate_batch(model, x).boxes == locate_batch(model, x, LocateConfig(method="cam")).boxes


def test_manifest_refuses_a_head_on_blocks_the_architecture_lacks(net, tmp_path):
    export_checkpoint(net, tmp_path / "ckpt", class_names=tuple("abcdef"), model_name="t", model_version="v1")
    path = tmp_path / "ckpt" / "manifest.json"
    path.write_text(path.read_text().replace('"layers": [\n      3,', '"layers": [\n      30,'))
    with pytest.raises(CheckpointError, match="boxes.layers"):
        read_manifest(tmp_path / "ckpt")


def test_manifest_refuses_class_thresholds_that_do_not_match_its_classes(net, tmp_path):
    export_checkpoint(net, tmp_path / "ckpt", class_names=tuple("abcdef"), model_name="t", model_version="v1")
    path = tmp_path / "ckpt" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["boxes"]["class_thresholds"] = [0.2, 0.3]
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="class_thresholds"):
        read_manifest(tmp_path / "ckpt")


def test_head_spec_bounds_what_a_manifest_may_ask_for():
    with pytest.raises(ValueError):
        BoxHeadSpec(layers=(3,), hidden=100_000, fitted_images=1)
    with pytest.raises(ValueError):
        BoxHeadSpec(layers=(), hidden=8, fitted_images=1)
    with pytest.raises(ValueError, match="min_boxes"):
        BoxHeadSpec(layers=(3,), hidden=8, fitted_images=1, min_boxes=9, max_boxes=8)
