import json
from dataclasses import replace

import pytest

from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import build_model
from trainer.train import TrainConfig, fit


@pytest.fixture
def smoke_cfg(neu_cls, tmp_path):
    return TrainConfig(data=neu_cls, out=tmp_path / "run", epochs=2, batch_size=32, lr=0.05, warmup_epochs=0,
                       limit_per_class=12, split=(0.75, 0.25), progress=False)


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_two_epoch_smoke_run_learns_and_exports(smoke_cfg):
    result = fit(smoke_cfg)
    rows = _log(smoke_cfg.out)
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
    rows = _log(smoke_cfg.out)
    assert [r["epoch"] for r in rows] == [1, 2]


def test_distillation_uses_the_teacher(smoke_cfg, tmp_path):
    teacher = export_checkpoint(build_model(EG_REPVGG, 6), tmp_path / "teacher",
                                class_names=("a", "b", "c", "d", "e", "f"), model_name="teacher")
    fit(replace(smoke_cfg, epochs=1, teacher=tmp_path / "teacher", teacher_cache_dir=tmp_path / "cache"))
    rows = _log(smoke_cfg.out)
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
