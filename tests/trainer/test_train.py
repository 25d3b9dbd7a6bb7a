import json
from dataclasses import replace

import pytest
import torch

from schemas.checkpoint import InputSpec
from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import build_model
from tests.helpers.images import hue_folder
from trainer.runlog import read_rows
from trainer.train import TrainConfig, fit, supcon_loss


@pytest.fixture
def smoke_cfg(neu_cls, tmp_path):
    return TrainConfig(data=neu_cls, out=tmp_path / "run", epochs=2, batch_size=32, lr=0.05, warmup_epochs=0,
                       limit_per_class=12, split=(0.75, 0.25), progress=False)


def test_two_epoch_smoke_run_learns_and_exports(smoke_cfg):
    result = fit(smoke_cfg)
    rows = read_rows(smoke_cfg.out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    for name in ("split.json", "config.json", "log.csv", "best.pt", "last.pt", "curves.png", "confusion_val.png",
                 "metrics.json"):
        assert (smoke_cfg.out / name).is_file(), name
    model, manifest = load_checkpoint(smoke_cfg.out / "model")
    assert manifest.class_names == tuple(sorted(p.name for p in smoke_cfg.data.iterdir() if p.is_dir()))
    assert manifest.metrics["val_accuracy"] == result.val.accuracy and result.val.n == 18
    assert len(manifest.data_fingerprint) == 64


def test_resume_continues_from_the_last_epoch(smoke_cfg):
    fit(replace(smoke_cfg, epochs=1))
    fit(smoke_cfg)  # same out dir: resumes at epoch 2
    rows = read_rows(smoke_cfg.out)
    assert [r["epoch"] for r in rows] == [1, 2]


def test_distillation_uses_the_teacher(smoke_cfg, tmp_path):
    teacher = export_checkpoint(build_model(EG_REPVGG, 6), tmp_path / "teacher",
                                class_names=("a", "b", "c", "d", "e", "f"), model_name="teacher")
    fit(replace(smoke_cfg, epochs=1, teacher=tmp_path / "teacher", teacher_cache_dir=tmp_path / "cache"))
    rows = read_rows(smoke_cfg.out)
    assert rows[0]["train_kd"] > 0
    assert len(list((tmp_path / "cache").glob("teacher-logits-*.pt"))) == 1
    assert load_checkpoint(smoke_cfg.out / "model")[1].teacher == teacher.model_name


def test_training_on_every_image_keeps_the_last_epoch(smoke_cfg):
    cfg = replace(smoke_cfg, split=(1.0,), select="last", ema_decay=0.9, jitter=True, label_smoothing=0.1)
    result = fit(cfg)
    assert result.val is None and result.best_epoch == 2
    assert not (cfg.out / "metrics.json").exists()
    split = json.loads((cfg.out / "split.json").read_text())
    assert len(split["train"]) == 72 and "val" not in split
    _, manifest = load_checkpoint(cfg.out / "model")
    assert manifest.metrics == {"epochs": 2.0}


@pytest.fixture
def hue_cfg(tmp_path):
    """Three classes told apart by colour alone, 24×24 (trained at --min-size 200), imbalanced 12:12:4."""
    data = hue_folder(tmp_path / "hues", {"red": 12, "green": 12, "blue": 4})
    return TrainConfig(data=data, out=tmp_path / "run", epochs=2, batch_size=16, lr=0.05, warmup_epochs=0,
                       split=(0.75, 0.25), progress=False)


def test_small_colour_data_train_an_upsampled_rgb_model_unbalanced_and_selected_by_macro_f1(hue_cfg):
    fit(hue_cfg)
    _, manifest = load_checkpoint(hue_cfg.out / "model")
    assert (manifest.input.color, manifest.input.channels, manifest.input.size) == ("rgb", 3, 200)
    notes = json.loads((hue_cfg.out / "input.json").read_text())["notes"]
    assert notes[0].startswith("colour rgb")
    assert notes[1] == ("size 200×200: the images' own size (all 28 are 24×24) is 24, below --min-size; "
                        "every image is upsampled")
    assert notes[2] == "balance none (--balance none; largest/smallest class 3.00)"
    assert notes[3] == "select by macro-F1 on validation" and notes[2] in manifest.notes
    assert all(0.0 <= row["val_macro_f1"] <= 1.0 for row in read_rows(hue_cfg.out))


def test_distillation_from_a_colour_teacher_and_a_gray_teacher_is_refused(hue_cfg, tmp_path):
    teacher = fit(replace(hue_cfg, out=tmp_path / "teacher", epochs=1, model_name="tiny-teacher",
                          balance="sampling")).out / "model"
    assert "balance sampling" in load_checkpoint(teacher)[1].notes
    student = replace(hue_cfg, epochs=1, teacher=teacher, balance="loss")
    fit(student)
    assert read_rows(student.out)[0]["train_kd"] > 0
    assert load_checkpoint(student.out / "model")[1].teacher == "tiny-teacher"
    export_checkpoint(build_model(EG_REPVGG, 3), tmp_path / "gray-teacher", class_names=("a", "b", "c"),
                      model_name="gray", input_spec=InputSpec(size=200))
    with pytest.raises(ValueError, match="teacher .* takes gray 200×200, the student's data are rgb 200×200"):
        fit(replace(student, out=tmp_path / "refused", teacher=tmp_path / "gray-teacher"))


def test_supcon_loss_is_low_for_class_clusters_and_skips_anchors_without_a_positive():
    y = torch.tensor([0, 0, 1, 1, 2])  # class 2 has one image: no positive, not an anchor
    centres = torch.eye(3) * 5
    clustered = centres[y] + 0.01 * torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    mixed = centres[torch.tensor([0, 1, 0, 1, 2])]
    assert supcon_loss(clustered, y, 0.1) < 0.01 < supcon_loss(mixed, y, 0.1)
    assert supcon_loss(clustered, torch.tensor([0, 1, 2, 3, 4]), 0.1) == 0


def test_supcon_weight_trains_the_contrastive_term_and_names_it_in_the_manifest(smoke_cfg):
    fit(replace(smoke_cfg, epochs=1, supcon=0.5))
    assert read_rows(smoke_cfg.out)[0]["train_supcon"] > 0
    recipe = load_checkpoint(smoke_cfg.out / "model")[1].recipe
    assert recipe["supcon"] == 0.5 and recipe["supcon_temperature"] == 0.1
