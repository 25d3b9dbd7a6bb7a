import json
import subprocess
import sys

import pytest

from stripnet.bundled import default_model_dir
from trainer.cli import main


def test_summary_json_has_table1(capsys):
    assert main(["summary", "--arch", "eg-repvgg", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["train_parameters"] == 157_911 and doc["inference_parameters"] == 140_831
    assert [b["parameters"] for b in doc["blocks"]][:2] == [309, 849]
    assert 19e6 < doc["macs"] < 20e6


def test_summary_fused_teacher_as_console_script():
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "summary", "--arch", "repvgg-a0", "--fused"],
                         capture_output=True, text=True, check=True).stdout
    assert "inference parameters 7,036,070" in out


def test_evaluate_a_missing_model_is_a_clear_error(capsys, tmp_path, neu_cls):
    assert main(["evaluate", "--model", str(tmp_path), "--data", str(neu_cls)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_reproduce_chains_the_protocol_on_a_tiny_subset(neu_cls, tmp_path, capsys):
    out = tmp_path / "repro"
    args = ["reproduce", "--data", str(neu_cls), "--out", str(out), "--teacher-epochs", "1", "--student-epochs", "1",
            "--seeds", "0", "--limit-per-class", "5", "--split", "3:2", "--size", "64", "--no-progress"]
    assert main(args) == 0
    report = capsys.readouterr().out
    for row in ("| repvgg-a0 |", "| eg-repvgg |", "| kd-eg-repvgg |"):
        assert row in report
    for run in ("teacher", "eg-s0", "kd-s0"):
        assert (out / run / "model" / "manifest.json").is_file()
    assert json.loads((out / "kd-s0" / "split.json").read_text())["val"] == \
        json.loads((out / "teacher" / "split.json").read_text())["val"]  # one split for every row
    for figure in ("validation_curves", "confusion", "grad_cam", "feature_maps"):
        assert (out / "figures" / f"{figure}.png").is_file()
    assert main(args) == 0  # finished stages are skipped: a re-run only rewrites the report


def test_evaluate_json_on_a_trained_run(neu_cls, tmp_path, capsys):
    if not (default_model_dir() / "manifest.json").is_file():
        pytest.skip("no bundled model in this checkout")
    assert main(["evaluate", "--model", "default", "--data", str(neu_cls), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"n", "accuracy", "mcc", "macro_f1", "per_class", "confusion"}
    assert doc["n"] == 1620 and doc["accuracy"] > 0.95


def test_bundled_model_classifies_shared_images(neu_cls):
    from stripnet.checkpoint import load_checkpoint
    from trainer.data import load_image_folder
    from trainer.evaluate import evaluate

    model, manifest = load_checkpoint(default_model_dir())
    assert manifest.model_name == "eg-repvgg" and manifest.metrics["cv_images"] == 1620  # its recipe's CV figures
    data = load_image_folder(neu_cls, manifest.input.size, limit_per_class=4)
    assert evaluate(model, data, manifest.input, manifest.class_names).accuracy == 1.0
