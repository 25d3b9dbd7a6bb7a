"""Training the localization head: D4 moves boxes as it moves pixels, targets decode back to their boxes, the
head learns a synthetic defect's place, and the commands add a head without touching the classifier."""

import json
import math

import cv2
import numpy as np
import pytest
import torch

from stripnet.architectures import EG_REPVGG
from stripnet.boxhead import cell_boxes, decode
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import build_model
from trainer.boxes import (THRESHOLD_GRID, best_f1_thresholds, box_set, choose_thresholds, dense_giou, dihedral_boxes,
                           one_class, targets, threshold_counts)
from trainer.data import dihedral, load_image_folder, load_split
from trainer.cli import main
from tests.helpers.images import write_image
from tests.helpers.models import randomize_bn

CLASSES = ("dent", "scratch")


@pytest.mark.parametrize("t", range(8))
def test_a_transform_moves_boxes_with_the_pixels(t):
    size, box = 40, (3, 5, 17, 12)
    mask = torch.zeros(size, size)
    mask[box[1]:box[3], box[0]:box[2]] = 1
    moved = dihedral(mask, t)
    rows, cols = torch.nonzero(moved, as_tuple=True)
    expected = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    assert dihedral_boxes([box], t, size) == (expected,)


def test_targets_put_a_peak_of_one_at_the_centre_and_decode_back_to_the_box():
    box = (44.0, 60.0, 124.0, 100.0)  # centre (84, 80), 80 × 40 px
    target = targets([[box]], [1], 2, (25, 25), 8)
    assert target.heat[0, 1].max() == 1.0 and target.heat[0, 1, 10, 10] == 1.0 and target.heat[0, 0].max() == 0
    assert target.centres.sum() == 1 and target.centres[0, 10, 10]
    heat = target.heat.clamp(1e-6, 1 - 1e-6)
    maps = torch.cat([torch.log(heat / (1 - heat)), target.regression], dim=1)
    found = decode(maps, torch.tensor([1]), 8, 200, score_threshold=0.99, max_boxes=8)
    np.testing.assert_allclose(found.corners[0], [box], atol=1e-3)
    assert target.regression[0, 2, 10, 10] == pytest.approx(math.log(10))


def test_centre_iou_makes_the_cells_near_a_large_box_centre_centres_too_and_each_decodes_to_the_box():
    large, small = (20.0, 52.0, 148.0, 124.0), (168.0, 168.0, 184.0, 184.0)  # 16 × 9 cells; 2 × 2 cells
    target = targets([[large, small]], [0], 1, (25, 25), 8, centre_iou=0.7)
    centres = target.centres[0]
    assert centres[11, 8] and centres[11, 13] and not centres[11, 14] and not centres[13, 10]  # centre (10.5, 11)
    assert centres[22, 22] and int(centres[19:, 19:].sum()) == 1  # a small box keeps its one cell
    assert torch.equal(target.heat[0, 0][centres], torch.ones(int(centres.sum())))
    assert target.objects.tolist() == [2] and int(centres.sum()) > 2
    rows, cols = torch.nonzero(centres[:15], as_tuple=True)
    boxes = cell_boxes(target.regression[0][:, rows, cols], rows, cols) * 8
    np.testing.assert_allclose(boxes.numpy(), np.tile(large, (len(rows), 1)), atol=1e-4)
    assert torch.equal(targets([[large]], [0], 1, (25, 25), 8).centres.nonzero(), torch.tensor([[0, 11, 10]]))


def test_every_cell_inside_a_box_regresses_it_and_a_cell_of_two_boxes_takes_the_higher_peak():
    small, large = (92.0, 92.0, 116.0, 108.0), (20.0, 20.0, 180.0, 180.0)  # centres (104, 100), (100, 100)
    target = targets([[large, small]], [0], 1, (25, 25), 8)
    inside = target.weight[0] > 0
    assert inside[3, 3] and inside[22, 22] and not inside[1, 1]  # large: cells 2.5 … 22.5
    assert torch.equal(target.boxes[0, :, 12, 13], torch.tensor(small) / 8)  # the small box's peak is there
    assert torch.equal(target.boxes[0, :, 5, 5], torch.tensor(large) / 8)
    exact = torch.zeros(1, 4, 25, 25)
    rows, cols = torch.meshgrid(torch.arange(25.0), torch.arange(25.0), indexing="ij")
    x0, y0, x1, y1 = target.boxes[0]
    exact[0] = torch.stack([(x0 + x1) / 2 - cols, (y0 + y1) / 2 - rows, (x1 - x0).clamp(min=1e-3).log(),
                            (y1 - y0).clamp(min=1e-3).log()])
    assert float(dense_giou(exact, target)) == pytest.approx(0, abs=1e-5)
    wrong = exact.clone()
    wrong[:, 2:] -= math.log(2)  # half the width and height everywhere: IoU 1/4
    assert float(dense_giou(wrong, target)) == pytest.approx(0.75 * float(target.weight.sum()), rel=1e-4)


def _folder(root, n_per_class: int = 6, seed: int = 0):
    """Gray 200×200 frames, one bright rectangle each (its VOC box), class by the rectangle's shape."""
    rng = np.random.default_rng(seed)
    boxes = root / "boxes"
    boxes.mkdir(parents=True)
    for cls in CLASSES:
        for i in range(n_per_class):
            image = rng.integers(80, 100, (200, 200), dtype=np.uint8)
            w, h = (60, 60) if cls == "dent" else (120, 24)
            x0, y0 = int(rng.integers(0, 200 - w)), int(rng.integers(0, 200 - h))
            image[y0:y0 + h, x0:x0 + w] = 220
            write_image(root / "data" / cls / f"{cls}_{i}.png", image)
            (boxes / f"{cls}_{i}.xml").write_text(
                f"<annotation><filename>{cls}_{i}.jpg</filename><size><width>200</width><height>200</height>"
                f"<depth>1</depth></size><object><name>{cls}</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}"
                f"</ymin><xmax>{x0 + w}</xmax><ymax>{y0 + h}</ymax></bndbox></object></annotation>")
    return root / "data", boxes


def test_each_class_takes_the_threshold_of_best_f1_the_higher_on_ties_and_the_default_without_boxes():
    grid = len(THRESHOLD_GRID)
    truth = np.array([[10] * grid, [4] * grid, [0] * grid], dtype=float)
    predicted = np.array([np.linspace(30, 2, grid), [4] * grid, [0] * grid])
    matched = np.array([np.minimum(np.linspace(30, 2, grid), 8), [2] * grid, [0] * grid])
    chosen = best_f1_thresholds(matched, predicted, truth, default=0.3)
    f1 = 2 * matched[0] / (predicted[0] + truth[0])
    assert chosen[0] == THRESHOLD_GRID[int(f1.argmax())]  # class 0: one best point
    assert chosen[1] == THRESHOLD_GRID[-1] and chosen[2] == 0.3  # a flat F1 keeps the highest; no boxes: default


def test_boxes_command_adds_a_head_that_beats_the_whole_frame_and_frozen_leaves_the_classifier_alone(tmp_path,
                                                                                                      capsys):
    data, boxes = _folder(tmp_path)
    torch.manual_seed(0)
    export_checkpoint(randomize_bn(build_model(EG_REPVGG, 2)), tmp_path / "model", class_names=CLASSES,
                      model_name="t", model_version="v1")
    before, _ = load_checkpoint(tmp_path / "model")
    assert main(["boxes", "--model", str(tmp_path / "model"), "--data", str(data), "--boxes", str(boxes),
                 "--epochs", "100", "--hidden", "16", "--lr", "0.01", "--score-threshold", "0.1",
                 "--layers", "3", "7", "8", "--finetune-epochs", "0", "--class-thresholds"]) == 0
    after, manifest = load_checkpoint(tmp_path / "model")
    assert manifest.boxes is not None and manifest.boxes.fitted_images == 12 and manifest.model_version == "v1"
    assert manifest.boxes.recipe["epochs"] == 100 and manifest.boxes.recipe["finetune_epochs"] == 0
    assert manifest.boxes.recipe["giou_weight"] == 1.0 and manifest.boxes.recipe["class_thresholds"] is True
    assert len(manifest.boxes.class_thresholds) == 2 and set(manifest.boxes.class_thresholds) <= set(THRESHOLD_GRID)
    x = torch.randn(3, 3, 200, 200)
    with torch.inference_mode():
        torch.testing.assert_close(after(x), before(x))  # the classifier is what it was

    capsys.readouterr()
    assert main(["locate", "--model", str(tmp_path / "model"), "--data", str(data), "--boxes", str(boxes),
                 "--json", "--examples", str(tmp_path / "ex")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "head" and report["images"] == 12
    overall, whole = report["rows"]["overall"], report["baseline"]["overall"]
    assert overall["mean_best_iou"] > whole["mean_best_iou"] + 0.2  # on its training images: it fits
    assert report["map"]["map_50"] > report["baseline_map"]["map_50"]
    assert all(name.endswith("-head.png") and cv2.imread(str(tmp_path / "ex" / name)) is not None
               for name in (p.name for p in (tmp_path / "ex").iterdir()))
    assert main(["locate", "--model", str(tmp_path / "model"), "--data", str(data), "--boxes", str(boxes),
                 "--json", "--method", "cam"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "cam"


def _two_fold_cv(root):
    """`_folder`'s images (4 per class) and a `trainer cv` run of two folds under root/cv: fold k holds out every
    other image from the k-th, its model a random-BN student."""
    data, boxes = _folder(root, n_per_class=4)
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*.png"))
    for k in range(2):
        torch.manual_seed(k)
        export_checkpoint(randomize_bn(build_model(EG_REPVGG, 2)), root / "cv" / f"fold-{k}" / "student" / "model",
                          class_names=CLASSES, model_name="t", model_version=f"fold{k}")
        (root / "cv" / f"fold-{k}" / "split.json").write_text(json.dumps(
            {"train": [f for i, f in enumerate(files) if i % 2 != k], "val": files[k::2]}))
    return data, boxes


def test_boxes_cv_fine_tunes_one_network_and_head_per_fold_scores_the_fold_it_never_saw_and_resumes(tmp_path):
    data, boxes = _two_fold_cv(tmp_path)
    args = ["boxes-cv", "--cv", str(tmp_path / "cv"), "--data", str(data), "--boxes", str(boxes),
            "--out", str(tmp_path / "out"), "--epochs", "2", "--hidden", "4", "--no-augment", "--finetune-lr", "1e-3",
            "--finetune-epochs", "2"]
    assert main(args) == 0
    doc = json.loads((tmp_path / "out" / "boxes-cv.json").read_text())
    assert [f["fold"] for f in doc["folds"]] == ["fold-0", "fold-1"]
    assert all(f["images"] == 4 and 0 <= f["accuracy"] <= 1 for f in doc["folds"])
    tuned, _ = load_checkpoint(tmp_path / "out" / "fold-0" / "model")
    before, _ = load_checkpoint(tmp_path / "cv" / "fold-0" / "student" / "model")
    assert not torch.equal(tuned.blocks[0].reparam_conv.weight, before.blocks[0].reparam_conv.weight)
    assert doc["pooled"]["head"]["images"] == 8 and doc["pooled"]["cam"]["images"] == 8
    for k in range(2):
        _, manifest = load_checkpoint(tmp_path / "out" / f"fold-{k}" / "model")
        assert manifest.boxes.fitted_images == 4 and manifest.model_version == f"fold{k}"
    assert "| localization head |" in (tmp_path / "out" / "boxes-cv.md").read_text()
    stamp = (tmp_path / "out" / "fold-0" / "model" / "manifest.json").stat().st_mtime_ns
    assert main(args + ["--min-boxes", "3"]) == 0  # resumes: the fold heads are kept, served as this run says
    assert (tmp_path / "out" / "fold-0" / "model" / "manifest.json").stat().st_mtime_ns == stamp
    rescored = json.loads((tmp_path / "out" / "boxes-cv.json").read_text())["pooled"]["head"]["rows"]["overall"]
    assert rescored["boxes_per_image"] >= 3 > doc["pooled"]["head"]["rows"]["overall"]["boxes_per_image"]


def test_boxes_cv_with_one_threshold_also_serves_each_fold_the_thresholds_of_the_other_folds(tmp_path):
    data, boxes = _two_fold_cv(tmp_path)
    assert main(["boxes-cv", "--cv", str(tmp_path / "cv"), "--data", str(data), "--boxes", str(boxes),
                 "--out", str(tmp_path / "out"), "--epochs", "2", "--hidden", "4", "--no-augment",
                 "--finetune-epochs", "0", "--no-class-thresholds"]) == 0
    doc = json.loads((tmp_path / "out" / "boxes-cv.json").read_text())
    crossed = doc["other_folds_thresholds"]
    images = load_image_folder(data, 200)
    for k in range(2):
        other, manifest = load_checkpoint(tmp_path / "out" / f"fold-{1 - k}" / "model")
        assert manifest.boxes.class_thresholds is None  # each fold's own head serves one threshold
        held_out_idx = load_split(tmp_path / "cv" / f"fold-{1 - k}" / "split.json", images)[1]
        held_out = box_set(images.subset(held_out_idx), boxes, CLASSES, 200)
        assert tuple(crossed["per_fold"][k].values()) == choose_thresholds(other, held_out, manifest.input, 0.3)
        counts = threshold_counts(other, held_out, manifest.input)
        assert (doc["other_folds_one_threshold"]["per_fold"][k],) == best_f1_thresholds(*one_class(counts), 0.3)
    assert crossed["pooled"]["images"] == doc["other_folds_one_threshold"]["pooled"]["images"] == 8
    report = (tmp_path / "out" / "boxes-cv.md").read_text()
    assert "per-class thresholds from the other folds" in report and "one threshold from the other folds" in report
