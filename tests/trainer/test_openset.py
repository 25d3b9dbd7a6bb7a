import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers.images import texture_folder
from trainer.cli import main
from trainer.openset import OUTPUTS, SHIPPED, load_split_outputs

SIZE = 32


@pytest.fixture
def folder(tmp_path) -> Path:
    return texture_folder(tmp_path / "data", size=SIZE)


def test_openset_holds_each_class_out_once_reports_every_score_and_resumes(folder, tmp_path, capsys):
    args = ["openset", "--data", str(folder), "--out", str(tmp_path / "run"), "--epochs", "1", "--size", str(SIZE),
            "--batch-size", "16", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    assert "| score | mean AUROC |" in capsys.readouterr().out
    doc = json.loads((tmp_path / "run" / "openset.json").read_text())
    assert doc["served"] == SHIPPED and set(doc["accuracy"]) == {"a", "b", "c"}
    shipped = doc["methods"][SHIPPED]["0.01"]["splits"]
    for held_out, row in shipped.items():
        out = load_split_outputs(tmp_path / "run" / f"without-{held_out}" / OUTPUTS)
        assert held_out not in out.class_names and len(out.class_names) == 2
        assert row["unknown_images"] == 20 and 0 <= row["auroc"] <= 1
        assert row["calibration_images"] == int((out.where("train") | out.where("val")).sum())
    assert (tmp_path / "run" / "scores.png").stat().st_size > 0
    stamp = (tmp_path / "run" / "without-a" / OUTPUTS).stat().st_mtime_ns
    assert main(args) == 0  # resumes: finished splits are not trained again
    assert (tmp_path / "run" / "without-a" / OUTPUTS).stat().st_mtime_ns == stamp
    assert out.corr and all(len(t) == len(out.labels) for t in out.corr.values())


def test_outputs_written_before_the_correlation_features_are_written_again_without_training(folder, tmp_path):
    args = ["openset", "--data", str(folder), "--out", str(tmp_path / "run"), "--epochs", "1", "--size", str(SIZE),
            "--batch-size", "16", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    split = tmp_path / "run" / "without-b"
    with safe_open(split / OUTPUTS, "pt") as f:
        meta = f.metadata()
    save_file({k: t for k, t in load_file(split / OUTPUTS).items() if not k.startswith("corr_")}, split / OUTPUTS,
              metadata=meta)  # as the first outputs files were
    epochs = (split / "run" / "log.csv").read_text()
    assert main(args) == 0
    assert load_split_outputs(split / OUTPUTS).corr
    assert (split / "run" / "log.csv").read_text() == epochs  # no epoch trained again
