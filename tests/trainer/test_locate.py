"""`trainer locate`: scoring by hand cases, VOC parsing, and the command on a handful of images."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import build_model
from trainer.cli import main
from trainer.locate import best_iou, iou, iou_matrix, matched_at, pointing_hit, score_image, summarize
from trainer.voc import VocError, read_voc

BOXES = Path(__file__).resolve().parents[2] / "../shared/datasets/neu-det-boxes"


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


def test_recall_and_precision_pool_boxes_over_images():
    gt = [(0, 0, 10, 10), (100, 100, 110, 110)]
    one = score_image("a", True, (5, 5), [(0, 0, 10, 10), (50, 50, 60, 60), (70, 70, 80, 80)], gt)  # 1 of 3 right
    two = score_image("a", True, (5, 5), [(100, 100, 110, 110)], gt)  # 1 of 1
    row = summarize([one, two])
    assert row.recall == pytest.approx(2 / 4) and row.precision == pytest.approx(2 / 4)
    assert summarize([score_image("a", True, (5, 5), [], gt)]).precision == 0.0  # nothing served


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


def test_cli_scores_a_handful_of_images_and_writes_examples(tmp_path, capsys):
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
    torch.manual_seed(0)
    export_checkpoint(build_model(EG_REPVGG, 2), tmp_path / "model", class_names=("dent", "scratch"), model_name="t", model_version="v1")
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