"""The trainer CLI is generated from the configs: every field an option, defaults from the fields themselves."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from stripnet.cam import LocateConfig
from trainer.cli import build_parser
from trainer.cv import CVConfig
from trainer.distill import KDConfig
from trainer.options import from_args
from trainer.reproduce import ReproduceConfig
from trainer.train import TrainConfig


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def leaves(config: type) -> set[str]:
    names = set()
    for f in dataclasses.fields(config):
        names |= leaves(KDConfig) if f.name == "kd" else {f.name}
    return names


def test_fit_with_only_the_required_options_is_the_config_default() -> None:
    args = parse("fit", "--data", "d", "--out", "o")
    assert from_args(TrainConfig, args) == TrainConfig(data=Path("d"), out=Path("o"))
    assert leaves(TrainConfig) <= set(vars(args))  # every field, nested KD config included, is an option


def test_fit_options_reach_their_fields() -> None:
    args = parse("fit", "--data", "d", "--out", "o", "--arch", "repvgg-a0", "--ema", "0.99", "--size", "64",
                 "--split", "8:1", "--no-progress", "--t-squared", "--alpha", "0.5", "--teacher", "t/model",
                 "--select", "last", "--limit-per-class", "3", "--color", "rgb", "--chosen-by", "runs/cv")
    cfg = from_args(TrainConfig, args)
    assert (cfg.arch, cfg.ema_decay, cfg.size, cfg.progress, cfg.select) == ("repvgg-a0", 0.99, 64, False, "last")
    assert cfg.split == pytest.approx((8 / 9, 1 / 9)) and cfg.teacher == Path("t/model") and cfg.limit_per_class == 3
    assert (cfg.color, cfg.chosen_by) == ("rgb", Path("runs/cv"))
    assert cfg.kd == KDConfig(alpha=0.5, t_squared=True)
    with pytest.raises(SystemExit):
        parse("fit", "--data", "d", "--out", "o", "--arch", "resnet")


def test_cv_shares_the_recipe_options_and_keeps_its_own_defaults() -> None:
    args = parse("cv", "--data", "d", "--out", "o", "--epochs", "3", "--folds", "4", "--teacher")
    recipe = from_args(TrainConfig, args)
    cfg = from_args(CVConfig, args, recipe=recipe, teacher=None)
    assert recipe.epochs == 3 and recipe.threads is None and recipe.teacher is None
    assert (cfg.folds, cfg.threads, cfg.recipe) == (4, 1, recipe)  # --threads unset: the fold's own default
    assert args.per_fold_teacher and args.teacher_epochs == 100


def test_reproduce_and_locate_options_come_from_their_configs() -> None:
    args = parse("reproduce", "--data", "d", "--out", "o", "--seeds", "4", "5", "--no-teacher-bf16")
    assert from_args(ReproduceConfig, args) == ReproduceConfig(Path("d"), Path("o"), seeds=(4, 5), teacher_bf16=False)
    args = parse("locate", "--model", "m", "--data", "d", "--boxes", "b", "--threshold", "0.3", "--score", "max")
    assert from_args(LocateConfig, args) == LocateConfig(threshold=0.3, score="max")


def test_help_shows_each_default_from_its_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("fit", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS (default: 100)" in text and "--lr LR peak learning rate of SGD (default: 0.1)" in text
    assert "--arch {eg-repvgg,repvgg-a0}" in text
