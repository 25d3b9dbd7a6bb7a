import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stripnet.architectures import EG_REPVGG
from stripnet.cam import (
    LocateConfig, boxes_from_map, feature_stride, locate_batch, logits_and_cams, normalize_cam, upsample_cam,
)
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import build_model, reparameterize
from trainer.cli import main
from trainer.figures import grad_cam
from trainer.locate import best_iou, iou, iou_matrix, matched_at, pointing_hit
from trainer.voc import VocError, read_voc

BOXES = Path(__file__).resolve().parents[2] / "../shared/datasets/neu-det-boxes"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


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


def test_iou_hand_cases():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (0, 0, 5, 5)) == pytest.approx(0.25)
    assert iou((3, 3, 3, 8), (0, 0, 10, 10)) == 0.0  # empty box
    assert iou_matrix([], [(0, 0, 1, 1)]).shape == (0, 1)
    assert best_iou([], [(0, 0, 1, 1)]) == 0.0
    assert best_iou([(0, 0, 10, 10), (0, 0, 5, 5)], [(0, 0, 5, 5), (50, 50, 60, 60)]) == 1.0


def test_pointing_game_hand_cases():
    gt = [(10, 10, 20, 20), (50, 0, 60, 5)]
    assert pointing_hit((10, 10), gt) and pointing_hit((55, 4), gt)
    assert not pointing_hit((20, 15), gt)  # x1 is exclusive
    assert not pointing_hit((30, 30), gt)
    assert not pointing_hit((0, 0), [])
    assert pointing_hit((30, 15), gt, tolerance=11) and not pointing_hit((30, 15), gt, tolerance=10)  # 11 px right
    assert not pointing_hit((22, 22), gt, tolerance=4) and pointing_hit((22, 22), gt, tolerance=4.3)  # √18 ≈ 4.24
    assert pointing_hit((15, 15), gt, tolerance=15)


def test_recall_matches_one_to_one():
    gt = [(0, 0, 10, 10), (0, 0, 10, 10), (100, 100, 110, 110)]
    assert matched_at([(0, 0, 10, 10)], gt) == 1  # one prediction covers one ground truth only
    assert matched_at([(0, 0, 10, 10), (1, 0, 10, 10), (100, 100, 104, 110)], gt) == 2  # last IoU is 0.4
    assert matched_at([(100, 100, 104, 110)], gt, threshold=0.4) == 1
    assert matched_at([], gt) == 0


def test_voc_parsing_of_a_shared_file():
    path = BOXES / "crazing_1.xml"
    if not path.is_file():
        pytest.skip(f"shared NEU-DET boxes not found at {BOXES.resolve()}")
    ann = read_voc(path)
    assert (ann.filename, ann.width, ann.height) == ("crazing_1.jpg", 200, 200)
    assert [(o.name, o.corners) for o in ann.objects] == [("crazing", (1.0, 1.0, 193.0, 194.0))]


def test_voc_parsing_rejects_broken_files(tmp_path):
    (tmp_path / "bad.xml").write_text("<annotation><size>")
    with pytest.raises(VocError, match="well-formed"):
        read_voc(tmp_path / "bad.xml")
    (tmp_path / "nobox.xml").write_text(
        "<annotation><size><width>9</width><height>9</height></size><object><name>a</name></object></annotation>")
    with pytest.raises(VocError, match="bndbox"):
        read_voc(tmp_path / "nobox.xml")


def _voc(name: str, boxes: list[tuple[int, int, int, int]]) -> str:
    objects = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
        "</bndbox></object>" for a, b, c, d in boxes)
    return f"<annotation><size><width>200</width><height>200</height><depth>1</depth></size>{objects}</annotation>"


def test_cli_scores_a_handful_of_images_and_writes_examples(tmp_path, net, capsys):
    data, boxes, rng = tmp_path / "data", tmp_path / "boxes", np.random.default_rng(0)
    boxes.mkdir()
    for cls in ("dent", "scratch"):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            image = rng.integers(90, 110, (200, 200), dtype=np.uint8)
            image[40:120, 80:170] = 230
            cv2.imwrite(str(data / cls / f"{cls}_{i}.png"), image)
            if (cls, i) != ("scratch", 2):  # one image without annotation
                (boxes / f"{cls}_{i}.xml").write_text(_voc(cls, [(81, 41, 170, 120), (1, 1, 20, 20)]))
    model = build_model(EG_REPVGG, 2)
    model.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("head")}, strict=False)
    export_checkpoint(model, tmp_path / "model", class_names=("dent", "scratch"), model_name="t", model_version="v1")
    split = {"train": ["dent/dent_0.png", "scratch/scratch_0.png"],
             "val": [f"{c}/{c}_{i}.png" for c in ("dent", "scratch") for i in (1, 2)]}
    (tmp_path / "split.json").write_text(json.dumps(split))

    args = ["locate", "--model", str(tmp_path / "model"), "--data", str(data), "--boxes", str(boxes), "--json"]
    assert main(args + ["--split-file", str(tmp_path / "split.json"), "--examples", str(tmp_path / "ex")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["images"], report["skipped_unannotated"]) == (3, 1)
    assert set(report["rows"]) == {"dent", "scratch", "overall"}
    overall = report["rows"]["overall"]
    assert overall["images"] == 3 and overall["gt_boxes"] == 6
    assert 0 <= overall["pointing"] <= 1 and 0 <= overall["recall"] <= 1 and 0 <= overall["mean_best_iou"] <= 1
    assert report["baseline"]["overall"]["pointing"] == 1.0  # the frame centre (100, 100) lies in every big box
    pngs = sorted(p.name for p in (tmp_path / "ex").iterdir())
    assert len(pngs) == 2 and pngs[0].startswith("dent_") and pngs[1].startswith("scratch_")
    assert cv2.imread(str(tmp_path / "ex" / pngs[0])) is not None

    assert main(args[:-1] + ["--threshold", "0.3"]) == 0
    assert "overall" in capsys.readouterr().out
    load_checkpoint(tmp_path / "model")  # untouched


def test_the_model_package_pulls_in_no_training_serving_or_plotting_code():
    import subprocess
    import sys

    code = ("import sys, stripnet.bundled, stripnet.cam, stripnet.checkpoint, stripnet.preprocess; bad = [m for m "
            "in sys.modules if m.startswith(('trainer', 'inspector', 'matplotlib', 'torchvision'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
