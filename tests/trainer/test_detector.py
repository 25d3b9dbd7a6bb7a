from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from schemas.checkpoint import InputSpec
from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import build_model
from tests.helpers.images import texture_folder
from trainer.data import fingerprint, load_image_folder, stratified_split
from trainer.detector import (
    DetectorConfig, features_and_logits, fit_detector, refit_as, refit_checkpoint, unknown_report, unknown_scores,
)
from trainer.train import TrainConfig, fit

SIZE = 32


@pytest.fixture
def folder(tmp_path) -> Path:
    return texture_folder(tmp_path / "data", size=SIZE)


@pytest.mark.parametrize("method", ["knn", "mahalanobis", "combined"])
def test_the_detector_is_fitted_on_training_images_and_calibrated_on_every_held_in_one(folder, method):
    torch.manual_seed(0)
    data = load_image_folder(folder, SIZE)
    train, val = (data.subset(p) for p in stratified_split(data.labels, (0.5, 0.5), seed=0))
    model = fit_detector(build_model(EG_REPVGG, 3).eval(), data.class_names, train, val, InputSpec(size=SIZE), 0.1,
                         method)
    spec = model.ood.spec
    assert (spec.method, spec.calibrated_on, spec.fitted_images, spec.calibration_images) == (
        method, "training and validation", 30, 60)
    # a kept image is its own nearest neighbour: calibration scores it among the others
    features, logits = features_and_logits(model, train.images, InputSpec(size=SIZE), spec.layers,
                                           spec.corr_layers)
    held_in = np.concatenate([model.ood.fitted_scores(features, logits).numpy(),
                              unknown_scores(model, val.images, InputSpec(size=SIZE))])
    assert (held_in > spec.threshold).sum() == 6  # 10 % of 60, the (1 - 0.1) quantile interpolated
    if method == "mahalanobis":  # an untrained network's pooled features need not set noise apart; the bundled
        # model's detector flags foreign frames through the service (tests/inspector/test_unknown.py)
        noise = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (8, SIZE, SIZE), dtype=np.uint8))
        assert (unknown_scores(model, noise, InputSpec(size=SIZE)) > spec.threshold).all()


def test_fit_exports_a_calibrated_detector_and_says_where_it_was_calibrated(folder, tmp_path):
    cfg = TrainConfig(data=folder, out=tmp_path / "run", epochs=1, batch_size=16, size=SIZE, split=(0.75, 0.25),
                      progress=False)
    fit(cfg)
    model, manifest = load_checkpoint(cfg.out / "model")
    assert model.ood is not None and manifest.ood.calibrated_on == "training and validation"
    assert (manifest.ood.method, manifest.ood.layer, manifest.ood.spread, manifest.ood.fitted_images,
            manifest.ood.calibration_images, manifest.ood.knn_layers) == ("combined", 1, "log_std", 45, 60,
                                                                          tuple(range(2, len(EG_REPVGG.blocks))))
    assert (manifest.ood.corr_layers, manifest.ood.corr_dims) == ((2, 3, 4), 32)
    fit(replace(cfg, out=tmp_path / "all", split=(1.0,), select="last"))
    assert load_checkpoint(tmp_path / "all" / "model")[1].ood.calibrated_on == "training"


def test_refit_adds_a_detector_in_place_and_keeps_the_rest_of_the_manifest(folder, tmp_path):
    data = load_image_folder(folder, SIZE)
    before = export_checkpoint(build_model(EG_REPVGG, 3), tmp_path / "ckpt", class_names=data.class_names,
                               model_name="m", model_version="v1", input_spec=InputSpec(size=SIZE),
                               metrics={"val_accuracy": 0.5}, data_fingerprint=fingerprint(data), notes="kept")
    assert before.ood is None
    spec = refit_checkpoint(DetectorConfig(model=tmp_path / "ckpt", data=folder, split=(0.8, 0.2)))
    model, after = load_checkpoint(tmp_path / "ckpt")
    assert model.ood is not None and after.ood == spec and spec.calibration_images == 60
    assert (after.model_name, after.model_version, after.metrics, after.notes) == ("m", "v1", {"val_accuracy": 0.5}, "kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "data"]  # nothing staged is left behind


def test_refitting_as_a_spec_keeps_every_option_it_names(folder):
    data = load_image_folder(folder, SIZE)
    model = fit_detector(build_model(EG_REPVGG, 3).eval(), data.class_names, data, None, InputSpec(size=SIZE), 0.1,
                         knn_layers=(3, 8), corr_layers=(4,), corr_dims=3, neighbours=4, per_class=False)
    spec = model.ood.spec
    assert (spec.knn_layers, spec.corr_layers, spec.corr_dims, spec.neighbours, spec.per_class) == (
        (3, 8), (4,), 3, 4, False)
    assert refit_as(model, data.class_names, data, None, InputSpec(size=SIZE), spec).ood.spec == spec


def test_refit_refuses_data_the_model_was_not_trained_on(folder, tmp_path):
    data = load_image_folder(folder, SIZE)
    export_checkpoint(build_model(EG_REPVGG, 3), tmp_path / "ckpt", class_names=data.class_names, model_name="m",
                      input_spec=InputSpec(size=SIZE), data_fingerprint="0" * 64)
    with pytest.raises(ValueError, match="fingerprint"):
        refit_checkpoint(DetectorConfig(model=tmp_path / "ckpt", data=folder))


def test_the_unknown_report_counts_a_folder_overall_and_per_class(folder):
    torch.manual_seed(0)
    data = load_image_folder(folder, SIZE)
    model = fit_detector(build_model(EG_REPVGG, 3).eval(), data.class_names, data, None, InputSpec(size=SIZE), 0.1,
                         "mahalanobis")  # serves its training images' calibration scores exactly
    report = unknown_report(model, data, InputSpec(size=SIZE))
    assert report["images"] == 60 and report["unknown_rate"] == pytest.approx(0.1)
    assert set(report["per_class"]) == {"a", "b", "c"}
    assert unknown_report(model, data, InputSpec(size=SIZE), threshold=1e9)["unknown_rate"] == 0.0


def test_the_cli_fits_a_detector_and_evaluate_reports_the_unknown_rate_of_a_foreign_folder(folder, tmp_path, capsys):
    from trainer.cli import main

    data = load_image_folder(folder, SIZE)
    export_checkpoint(build_model(EG_REPVGG, 3), tmp_path / "ckpt", class_names=data.class_names, model_name="m",
                      input_spec=InputSpec(size=SIZE), data_fingerprint=fingerprint(data))
    assert main(["detector", "--model", str(tmp_path / "ckpt"), "--data", str(folder), "--split", "8:2"]) == 0
    assert "threshold" in capsys.readouterr().out
    foreign = tmp_path / "foreign" / "noise"
    foreign.mkdir(parents=True)
    (tmp_path / "foreign" / "flat").mkdir()
    for i in range(4):
        cv2.imwrite(str(foreign / f"{i}.png"), np.random.default_rng(i).integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
        cv2.imwrite(str(tmp_path / "foreign" / "flat" / f"{i}.png"), np.full((SIZE, SIZE), 120, np.uint8))
    assert main(["evaluate", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "foreign")]) == 0
    out = capsys.readouterr().out
    assert "does not know (flat, noise)" in out and "per folder: flat" in out
