import json

import pytest
import torch

from trainer.cli import main
from trainer.cv import stratified_folds, wilson_interval


def test_folds_cover_every_image_once_and_are_stratified():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 13)
    folds = stratified_folds(labels, 5, seed=3)
    flat = sorted(i for f in folds for i in f)
    assert flat == list(range(len(labels)))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for cls, count in enumerate((10, 7, 13)):
        per_fold = [sum(int(labels[i]) == cls for i in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == count
    assert folds == stratified_folds(labels, 5, seed=3)
    assert folds != stratified_folds(labels, 5, seed=4)


def test_folds_refuse_classes_smaller_than_k():
    with pytest.raises(ValueError, match="at least 5 images per class"):
        stratified_folds(torch.tensor([0] * 10 + [1] * 4), 5, seed=0)


def test_wilson_interval_matches_the_closed_form():
    low, high = wilson_interval(1612, 1620)  # 8 errors of 1,620
    assert low == pytest.approx(0.99027, abs=1e-4) and high == pytest.approx(0.99750, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == pytest.approx(0.0)


def test_cv_end_to_end_predicts_every_image_once_and_resumes(neu_cls, tmp_path, capsys):
    out = tmp_path / "cv"
    args = ["cv", "--data", str(neu_cls), "--out", str(out), "--folds", "3", "--limit-per-class", "6",
            "--epochs", "2", "--batch-size", "16", "--warmup-epochs", "0", "--label-smoothing", "0.1",
            "--ema", "0.9"]
    assert main(args) == 0
    doc = json.loads((out / "cv.json").read_text())
    assert doc["n"] == 36 and doc["folds"] == 3
    assert sum(f["n"] for f in doc["per_fold"].values()) == 36
    assert sum(map(sum, doc["pooled"]["confusion"])) == 36
    assert doc["errors"] == len(doc["misclassified"]) == round(36 * (1 - doc["pooled"]["accuracy"]))
    low, high = doc["wilson95"]
    assert low <= doc["pooled"]["accuracy"] <= high
    assert (out / "cv.md").read_text().startswith("# Cross-validation: 3 folds, 36 images")
    assert (out / "confusion.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0

    predicted = [row["path"] for k in range(3)
                 for row in json.loads((out / f"fold-{k}" / "predictions.json").read_text())["predictions"]]
    assert sorted(predicted) == sorted({p for p in predicted})  # each image exactly once
    for k in range(3):  # no fold's model was trained on the images it predicts
        split = json.loads((out / f"fold-{k}" / "split.json").read_text())
        assert not set(split["train"]) & set(split["val"])
        logged = json.loads((out / f"fold-{k}" / "student" / "split.json").read_text())
        assert logged["train"] == split["train"]

    # a re-run skips finished folds: nothing is retrained
    stamps = {k: (out / f"fold-{k}" / "predictions.json").stat().st_mtime_ns for k in range(3)}
    capsys.readouterr()
    assert main(args) == 0
    assert "3 done; running []" in capsys.readouterr().out
    assert stamps == {k: (out / f"fold-{k}" / "predictions.json").stat().st_mtime_ns for k in range(3)}


def test_cv_refuses_folds_drawn_for_other_settings(neu_cls, tmp_path):
    out = tmp_path / "cv"
    base = ["cv", "--data", str(neu_cls), "--out", str(out), "--limit-per-class", "3", "--epochs", "1",
            "--batch-size", "9", "--warmup-epochs", "0"]
    assert main(base + ["--folds", "3"]) == 0
    assert main(base + ["--folds", "2"]) == 2


def test_a_model_trained_on_every_image_records_the_cv_run_that_chose_it(neu_cls, tmp_path):
    from stripnet.checkpoint import load_checkpoint

    cv = ["--data", str(neu_cls), "--limit-per-class", "3", "--epochs", "1", "--batch-size", "9",
          "--warmup-epochs", "0", "--label-smoothing", "0.1"]
    assert main(["cv", "--out", str(tmp_path / "cv"), "--folds", "3", *cv]) == 0
    assert main(["fit", "--out", str(tmp_path / "ship"), "--split", "1", "--select", "last",
                 "--chosen-by", str(tmp_path / "cv"), "--no-progress", *cv]) == 0
    _, manifest = load_checkpoint(tmp_path / "ship" / "model")
    doc = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert manifest.metrics["cv_accuracy"] == doc["pooled"]["accuracy"]
    assert manifest.metrics["cv_errors"] == doc["errors"] and manifest.metrics["cv_images"] == 18
    assert manifest.recipe["label_smoothing"] == 0.1 and manifest.recipe["select"] == "last"
    assert manifest.recipe["split"] == "1" and manifest.recipe["chosen_by"] == str(tmp_path / "cv")


def test_each_fold_distills_from_a_teacher_trained_on_that_fold_only(neu_cls, tmp_path):
    from stripnet.checkpoint import read_manifest

    out = tmp_path / "cv"
    assert main(["cv", "--data", str(neu_cls), "--out", str(out), "--folds", "2", "--limit-per-class", "2",
                 "--epochs", "1", "--batch-size", "6", "--warmup-epochs", "0", "--size", "48",
                 "--teacher", "--teacher-epochs", "1"]) == 0
    for k in range(2):
        fold = out / f"fold-{k}"
        held_out = set(json.loads((fold / "split.json").read_text())["val"])
        teacher_split = json.loads((fold / "teacher" / "split.json").read_text())
        assert not held_out & set(teacher_split["train"])  # the teacher never trained on the fold's test images
        assert read_manifest(fold / "teacher" / "model").architecture.name == "repvgg-a0"
        assert read_manifest(fold / "student" / "model").teacher == "repvgg-a0-teacher"
