import json

import numpy as np
import pytest
import torch

from schemas.checkpoint import InputSpec, OODSpec
from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import export_checkpoint, load_checkpoint
from stripnet.network import build_model
from stripnet.ood import (calibrate, channel_correlations, channel_stats, combine, correlation_dim, fit_correlation_knn,
                          fit_head, fit_knn, ledoit_wolf, with_detector)

SPEC = OODSpec(layer=1, threshold=3.0, false_unknown_rate=0.01, calibrated_on="validation", calibration_images=30,
               fitted_images=90)


def _clusters(n_per_class: int = 200, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three Gaussian classes with one shared, correlated covariance: (features, labels, true means)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(3, dim, generator=gen) * 6
    mixing = torch.randn(dim, dim, generator=gen) / dim**0.5 + torch.eye(dim)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    return means[labels] + torch.randn(len(labels), dim, generator=gen) @ mixing.T, labels, means


def test_the_score_is_the_mahalanobis_distance_to_the_nearest_class_under_the_fitted_covariance():
    features, labels, _ = _clusters()
    head = fit_head(features, labels, 3)
    x = features.double()
    means = torch.stack([x[labels == c].mean(0) for c in range(3)])
    precision = torch.linalg.inv(ledoit_wolf(x - means[labels]))
    probe = torch.randn(16, x.shape[1], dtype=torch.float64) * 5
    d = probe[:, None, :] - means[None]
    expected = torch.einsum("nck,kl,ncl->nc", d, precision, d).min(dim=1).values.sqrt()
    torch.testing.assert_close(head(probe.float()).double(), expected, rtol=1e-4, atol=1e-4)


def test_far_away_features_score_higher_than_held_in_ones():
    features, labels, means = _clusters()
    head = fit_head(features, labels, 3)
    held_in, _, _ = _clusters(n_per_class=50, seed=0)
    far = means.mean(0) + 40 * torch.ones(features.shape[1])
    assert head(far[None]).item() > head(held_in).max().item()


def test_ledoit_wolf_matches_its_definition_and_is_invertible_with_fewer_samples_than_dimensions():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    x = x - x.mean(0)
    n, k = x.shape
    sample = x.T @ x / n
    mu = torch.trace(sample) / k
    spread = sum(((row[:, None] * row[None, :] - sample) ** 2).sum() for row in x) / n**2
    shrinkage = min(float(spread / ((sample - mu * torch.eye(k, dtype=x.dtype)) ** 2).sum()), 1.0)
    expected = (1 - shrinkage) * sample + shrinkage * mu * torch.eye(k, dtype=x.dtype)
    torch.testing.assert_close(ledoit_wolf(x), expected)
    assert torch.linalg.eigvalsh(ledoit_wolf(x)).min() > 0  # the sample covariance itself has rank 11


def test_calibration_flags_the_requested_share_of_held_in_scores():
    scores = np.random.default_rng(0).normal(size=10_000)
    threshold = calibrate(scores, 0.01)
    assert (scores > threshold).mean() == pytest.approx(0.01, abs=1e-3)
    assert calibrate(np.arange(101.0), 0.01) == pytest.approx(99.0)
    with pytest.raises(ValueError):
        calibrate(scores, 0.0)
    with pytest.raises(ValueError):
        calibrate(np.array([]), 0.01)


def test_fitting_needs_every_class():
    features, labels, _ = _clusters()
    with pytest.raises(ValueError, match="every class"):
        fit_head(features[labels < 2], labels[labels < 2], 3)


def _model_with_detector(classes: int = 6, spec: OODSpec = SPEC):
    torch.manual_seed(0)
    model = build_model(EG_REPVGG, classes).eval()
    x = torch.randn(24, 3, 32, 32)
    with torch.no_grad():
        _, stats = model.forward_with_features(x, spec.layers)
    head = fit_head(stats, torch.arange(24) % classes, classes, log_spread=spec.spread == "log_std")
    return with_detector(model, head, spec), x


@pytest.mark.parametrize("spec", [SPEC, SPEC.model_copy(update={"spread": "log_std"})], ids=["std", "log_std"])
def test_a_checkpoint_round_trips_its_detector(tmp_path, spec):
    model, x = _model_with_detector(spec=spec)
    written = export_checkpoint(model, tmp_path / "ckpt", class_names=tuple("abcdef"), model_name="t",
                                input_spec=InputSpec(size=32))
    loaded, manifest = load_checkpoint(tmp_path / "ckpt")
    assert written.ood == manifest.ood == spec and loaded.ood.log_spread == (spec.spread == "log_std")
    with torch.no_grad():
        expected = model.ood(model.forward_with_features(x, SPEC.layers)[1])
        logits, stats = loaded.forward_with_features(x, SPEC.layers)
        # the fused network's deviations differ in the last digits; logs of near-zero ones magnify that
        torch.testing.assert_close(loaded.ood(stats), expected, rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-4)


def test_a_model_without_a_detector_writes_none_and_an_uncalibrated_one_is_refused(tmp_path):
    model = build_model(EG_REPVGG, 6)
    assert export_checkpoint(model, tmp_path / "plain", class_names=tuple("abcdef"), model_name="t",
                             input_spec=InputSpec(size=32)).ood is None
    assert load_checkpoint(tmp_path / "plain")[0].ood is None
    calibrated, _ = _model_with_detector()
    calibrated.ood.spec = None
    with pytest.raises(ValueError, match="calibrated"):
        export_checkpoint(calibrated, tmp_path / "uncalibrated", class_names=tuple("abcdef"), model_name="t")


def test_a_detector_must_fit_the_model():
    model, _ = _model_with_detector(classes=6)
    with pytest.raises(ValueError, match="does not fit"):
        with_detector(build_model(EG_REPVGG, 5), model.ood, SPEC)
    with pytest.raises(ValueError, match="log deviations"):
        with_detector(build_model(EG_REPVGG, 6), model.ood, SPEC.model_copy(update={"spread": "log_std"}))


def test_log_spread_compares_the_deviations_as_logs():
    features, labels, _ = _clusters()
    logs = torch.cat([features, features / 4], dim=1)
    stats = torch.cat([features, (features / 4).exp()], dim=1)  # deviations whose logs are the Gaussian clusters
    plain, logged = fit_head(stats, labels, 3), fit_head(stats, labels, 3, log_spread=True)
    with torch.no_grad():
        torch.testing.assert_close(logged(stats), fit_head(logs, labels, 3)(logs), rtol=1e-3, atol=1e-3)
        assert not torch.allclose(plain(stats), logged(stats))


def test_the_features_are_one_blocks_channel_means_and_deviations_from_the_same_pass():
    torch.manual_seed(0)
    model = build_model(EG_REPVGG, 6).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, stats = model.forward_with_features(x, (1,))
        block2 = model.blocks[1](model.blocks[0](x))
        torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(stats, torch.cat([block2.mean((2, 3)), block2.std((2, 3), correction=0)], 1))
    assert channel_stats(block2).shape == (3, 2 * EG_REPVGG.blocks[1].out_channels)
    with pytest.raises(ValueError, match="block 9"):
        model.forward_with_features(x, (9,))


def test_knn_scores_the_distance_to_the_kth_nearest_kept_image_and_training_images_among_the_others():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    stats = torch.cat([means, torch.ones(4, 2)], dim=1)  # (N, 2C): the deviations play no part
    head = fit_knn(stats, neighbours=1)
    frame = torch.tensor([[2.0, 0.0, 5.0, 5.0], [0.0, -3.0, 5.0, 5.0]])  # along the first kept image; opposite
    with torch.no_grad():
        torch.testing.assert_close(head(frame), torch.tensor([0.0, 2 ** 0.5]), atol=1e-4, rtol=0)
    # each kept image's own distance is 0, so it is scored by its nearest *other* image
    torch.testing.assert_close(head.fitted_scores(stats)[3], torch.tensor(2 ** 0.5), atol=1e-4, rtol=0)  # (0, 1)


def test_a_checkpoint_round_trips_a_knn_detector(tmp_path):
    torch.manual_seed(0)
    model = build_model(EG_REPVGG, 6).eval()
    x = torch.randn(24, 3, 32, 32)
    last = len(EG_REPVGG.blocks) - 1
    with torch.no_grad():
        _, stats = model.forward_with_features(x, (last,))
    spec = SPEC.model_copy(update={"method": "knn", "layer": last, "neighbours": 3, "fitted_images": 24})
    with_knn = with_detector(model, fit_knn(stats, 3), spec)
    export_checkpoint(with_knn, tmp_path / "ckpt", class_names=tuple("abcdef"), model_name="t",
                      input_spec=InputSpec(size=32))
    loaded, manifest = load_checkpoint(tmp_path / "ckpt")
    assert manifest.ood == spec and loaded.ood.bank.shape == (24, EG_REPVGG.blocks[last].out_channels)
    with torch.no_grad():
        torch.testing.assert_close(loaded.ood(loaded.forward_with_features(x, (last,))[1]), with_knn.ood(stats),
                                   rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="not a mahalanobis"):
        with_detector(model, fit_knn(stats, 3), spec.model_copy(update={"method": "mahalanobis"}))
    with pytest.raises(ValueError, match="kept images"):
        OODSpec.model_validate(spec.model_dump() | {"neighbours": 30})


def test_the_combined_score_adds_every_distance_each_standardized_by_its_held_in_scores():
    features, labels, _ = _clusters()
    texture = fit_head(features, labels, 3)
    means = torch.cat([features[:, :2], torch.ones(len(features), 2)], dim=1)  # a kNN part's (N, 2C) stats
    other = torch.cat([features[:, 2:5], torch.ones(len(features), 3)], dim=1)  # a second block's
    knns = [fit_knn(means, 5), fit_knn(other, 5)]
    both = torch.cat([features, means, other], dim=1)
    with torch.no_grad():
        parts = torch.stack([texture(features), knns[0].fitted_scores(means), knns[1].fitted_scores(other)], dim=1)
        head = combine(texture, knns, parts)
        median, top = parts.quantile(0.5, dim=0), parts.quantile(0.99, dim=0)
        expected = ((parts - median) / (top - median)).sum(dim=1)
        torch.testing.assert_close(head.fitted_scores(both), expected, rtol=1e-4, atol=1e-4)
        probe = both[:5] + 3
        raw = torch.stack([texture(probe[:, :8]), knns[0](probe[:, 8:12]), knns[1](probe[:, 12:])], dim=1)
        torch.testing.assert_close(head(probe), ((raw - median) / (top - median)).sum(dim=1), rtol=1e-4, atol=1e-4)


def test_per_class_standardization_uses_the_held_in_scores_of_the_predicted_class():
    features, labels, _ = _clusters()
    texture = fit_head(features, labels, 3)
    means = torch.cat([features[:, :2], torch.ones(len(features), 2)], dim=1)
    knns = [fit_knn(means, 5)]
    both = torch.cat([features, means], dim=1)
    predicted = labels.clone()
    predicted[labels == 2] = 0  # class 2 is never predicted: its frames take every image's median and spread
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    with torch.no_grad():
        parts = torch.stack([texture(features), knns[0].fitted_scores(means)], dim=1)
        plain, head = combine(texture, knns, parts), combine(texture, knns, parts, predicted, 3)
        summed = plain.fitted_scores(both)
        scores = head.fitted_scores(both, logits)
        for c, rows in ((0, predicted == 0), (1, predicted == 1)):
            median, top = summed[rows].quantile(0.5), summed[rows].quantile(0.99)
            torch.testing.assert_close(scores[rows], (summed[rows] - median) / (top - median), rtol=1e-4, atol=1e-4)
        unseen = torch.nn.functional.one_hot(torch.full((5,), 2), 3).float()
        median, top = summed.quantile(0.5), summed.quantile(0.99)
        torch.testing.assert_close(head.fitted_scores(both[:5], unseen), (summed[:5] - median) / (top - median),
                                   rtol=1e-4, atol=1e-4)


def _combined(model, x: torch.Tensor, knn_layers: tuple[int, ...], per_class: bool = False,
              corr_layers: tuple[int, ...] = (), corr_dims: int = 5):
    """A combined detector on `knn_layers` (and `corr_layers`) fitted on `x`, its spec and the features it read."""
    spec = SPEC.model_copy(update={"method": "combined", "knn_layers": knn_layers, "spread": "log_std",
                                   "neighbours": 3, "fitted_images": len(x), "per_class": per_class,
                                   "corr_layers": corr_layers, "corr_dims": corr_dims if corr_layers else 0})
    with torch.no_grad():
        _, stats = model.forward_with_features(x, spec.layers, corr_layers)
        channels = [EG_REPVGG.blocks[b].out_channels for b in spec.blocks]
        stats_channels, corr_channels = channels[:len(spec.layers)], channels[len(spec.layers):]
        widths = [2 * c for c in stats_channels] + [correlation_dim(c) for c in corr_channels]
        bounds = np.cumsum([0, *widths]).tolist()
        texture = fit_head(stats[:, :bounds[1]], torch.arange(len(x)) % 6, 6, log_spread=True)
        knns = [fit_knn(stats[:, a:b], 3) if i < len(knn_layers) else fit_correlation_knn(stats[:, a:b], 3, corr_dims)
                for i, (a, b) in enumerate(zip(bounds[1:], bounds[2:]))]
        parts = [texture(stats[:, :bounds[1]]), *(k.fitted_scores(stats[:, a:b])
                                                  for k, a, b in zip(knns, bounds[1:], bounds[2:]))]
        logits = model(x)
        head = combine(texture, knns, torch.stack(parts, 1), logits.argmax(1) if per_class else None, 6)
    return with_detector(model, head, spec), spec, stats, knns, logits


def test_a_checkpoint_round_trips_a_combined_detector_on_several_blocks(tmp_path):
    torch.manual_seed(0)
    model = build_model(EG_REPVGG, 6).eval()
    x = torch.randn(24, 3, 32, 32)
    last = len(EG_REPVGG.blocks) - 1
    combined, spec, stats, knns, logits = _combined(model, x, (2, 5, last), per_class=True, corr_layers=(2, 3))
    export_checkpoint(combined, tmp_path / "ckpt", class_names=tuple("abcdef"), model_name="t",
                      input_spec=InputSpec(size=32))
    loaded, manifest = load_checkpoint(tmp_path / "ckpt")
    assert manifest.ood == spec and manifest.ood.blocks == (1, 2, 5, last, 2, 3)
    with torch.no_grad():
        features = loaded.forward_with_features(x, spec.layers, spec.corr_layers)[1]
        torch.testing.assert_close(loaded.ood(features, logits), combined.ood(stats, logits), rtol=2e-3, atol=1e-3)
    with pytest.raises(ValueError, match="not a combined"):
        with_detector(model, knns[0], spec)
    with pytest.raises(ValueError, match="per_class"):
        with_detector(model, combined.ood, spec.model_copy(update={"per_class": False}))
    with pytest.raises(ValueError, match="logits"):
        combined.ood(stats)
    for bad in ((), (2, 2)):
        with pytest.raises(ValueError, match="knn_layers"):
            OODSpec.model_validate(spec.model_dump() | {"knn_layers": bad})
    for field, bad in (("corr_dims", 0), ("corr_layers", (3, 3)), ("corr_layers", ())):
        with pytest.raises(ValueError, match="corr_"):
            OODSpec.model_validate(spec.model_dump() | {field: bad})


def test_channel_correlations_are_the_upper_triangle_of_each_maps_correlation_matrix():
    x = torch.randn(3, 5, 6, 7)
    x[:, 1] = 2 * x[:, 0] + 1  # perfectly correlated with channel 0
    got = channel_correlations(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == (3, 10)
    rows, cols = np.triu_indices(5, 1)
    for image, corr in zip(x, got):
        expected = np.corrcoef(image.flatten(1).numpy())[rows, cols]
        np.testing.assert_allclose(corr.numpy(), expected, atol=1e-5)
    assert torch.allclose(got[:, 0], torch.ones(3))


def test_channel_correlations_of_several_maps_compile_into_one_graph():
    # numpy's nonzero, which the upper triangle's indices were once made with, broke torch.compile's graph, and
    # then a constant made once per size failed to compile when two maps asked for it
    def features(*maps: torch.Tensor) -> torch.Tensor:
        return torch.cat([channel_correlations(x) for x in maps], dim=1)

    maps = (torch.randn(2, 5, 6, 7), torch.randn(2, 5, 3, 3), torch.randn(2, 8, 4, 4))
    assert torch._dynamo.explain(features)(*maps).graph_break_count == 0
    torch.testing.assert_close(torch.compile(features)(*maps), features(*maps))


def test_a_correlation_part_is_knn_on_standardized_principal_components():
    gen = torch.Generator().manual_seed(0)
    kept = torch.randn(50, 12, generator=gen) * torch.linspace(0.1, 5, 12) + 3
    head = fit_correlation_knn(kept, 4, 3)
    z = (kept.double() - kept.double().mean(0)) / kept.double().std(0)
    axes = torch.linalg.svd(z, full_matrices=False)[2][:3].T
    projected = torch.nn.functional.normalize(z @ axes, dim=1).float()
    torch.testing.assert_close(head.bank, projected, rtol=1e-4, atol=1e-4)
    new = torch.randn(5, 12, generator=gen)
    p = torch.nn.functional.normalize(((new.double() - kept.double().mean(0)) / kept.double().std(0)) @ axes, dim=1)
    kth = (2 - 2 * (p.float() @ projected.T).topk(4, dim=1).values[:, -1]).sqrt()
    torch.testing.assert_close(head(new), kth, rtol=1e-4, atol=1e-4)
    # a kept image is its own nearest neighbour: its score is its k-th among the others
    assert torch.all(head.fitted_scores(kept) >= head(kept) - 1e-6)
    assert fit_correlation_knn(kept[:6], 4, 32).bank.shape == (6, 6)  # no more axes than images


def test_a_checkpoint_with_one_knn_block_in_the_earlier_format_still_loads(tmp_path):
    torch.manual_seed(0)
    model = build_model(EG_REPVGG, 6).eval()
    x = torch.randn(24, 3, 32, 32)
    last = len(EG_REPVGG.blocks) - 1
    combined, spec, stats, _, _ = _combined(model, x, (last,))
    export_checkpoint(combined, tmp_path / "ckpt", class_names=tuple("abcdef"), model_name="t",
                      input_spec=InputSpec(size=32))
    path = tmp_path / "ckpt" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["ood"]["knn_layer"] = doc["ood"].pop("knn_layers")[0]  # as checkpoints before several blocks wrote it
    path.write_text(json.dumps(doc))
    loaded, manifest = load_checkpoint(tmp_path / "ckpt")
    assert manifest.ood == spec
    with torch.no_grad():
        torch.testing.assert_close(loaded.ood(stats), combined.ood(stats), rtol=2e-3, atol=1e-3)