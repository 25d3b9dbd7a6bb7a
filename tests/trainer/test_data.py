from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.helpers.images import hue_folder, write_image
from trainer.data import (
    ImageReadError, balance_note, camera_jitter, class_weights, dihedral, dihedral_batch, epoch_order,
    load_image_folder, load_split, save_split, stratified_split,
)


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def test_split_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 270 + [1] * 270 + [2] * 90)
    parts = stratified_split(labels, (0.8, 0.1, 0.1), seed=3)
    assert [len(p) for p in parts] == [504, 63, 63]
    assert set().union(*map(set, parts)) == set(range(len(labels))) and sum(map(len, parts)) == len(labels)
    assert torch.bincount(labels[parts[1]]).tolist() == [27, 27, 9]
    assert parts == stratified_split(labels, (0.8, 0.1, 0.1), seed=3)
    assert parts != stratified_split(labels, (0.8, 0.1, 0.1), seed=4)


def test_d4_has_eight_distinct_elements():
    x = torch.arange(9, dtype=torch.uint8).view(1, 3, 3)
    variants = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(variants) == 8
    ks = torch.tensor([0, 5, 7])
    batch = dihedral_batch(x.expand(3, 3, 3).clone(), ks)
    for i, k in enumerate(ks.tolist()):
        assert torch.equal(batch[i], dihedral(x[0], k))


def test_folder_of_mixed_sizes_colors_and_imbalance(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        _write(tmp_path / "a" / f"{i}.png", rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))  # colour, not square
    for i in range(2):
        _write(tmp_path / "b" / f"{i}.bmp", rng.integers(0, 255, (10, 10), dtype=np.uint8))  # small gray
    data = load_image_folder(tmp_path, size=32)
    assert data.images.shape == (7, 32, 32) and data.images.dtype == torch.uint8
    assert data.class_names == ("a", "b") and data.labels.tolist() == [0] * 5 + [1] * 2
    parts = stratified_split(data.labels, (0.6, 0.4), seed=0)
    save_split(tmp_path / "split.json", data, parts, seed=0)
    assert load_split(tmp_path / "split.json", data) == parts


def test_unreadable_image_names_the_file(tmp_path):
    _write(tmp_path / "a" / "ok.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        load_image_folder(tmp_path, size=8)


def test_folder_needs_classes(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    with pytest.raises(ValueError, match="one sub-folder per class"):
        load_image_folder(tmp_path)


def test_camera_jitter_is_seeded_and_keeps_the_frame():
    import torch

    from trainer.data import camera_jitter

    images = torch.randint(0, 256, (16, 40, 40), dtype=torch.uint8)
    a = camera_jitter(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, camera_jitter(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, images)
    flat = camera_jitter(torch.full((16, 40, 40), 128, dtype=torch.uint8), torch.Generator().manual_seed(2))
    assert all(int(f.max()) - int(f.min()) <= 1 for f in flat)  # geometry and blur leave a flat frame flat
    assert len({int(f[0, 0]) for f in flat}) > 4  # exposure differs per image


def test_one_colour_image_makes_the_set_rgb_in_rgb_order(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        write_image(tmp_path / "gray" / f"{i}.jpg", np.repeat(rng.integers(0, 255, (20, 20, 1), np.uint8), 3, axis=2))
    red = np.zeros((20, 20, 3), np.uint8)
    red[..., 0] = 255
    write_image(tmp_path / "red" / "0.png", red)
    data = load_image_folder(tmp_path, size=None, color="auto")
    assert data.color == "rgb" and data.images.shape == (4, 3, 20, 20)
    assert data.images[3, 0].min() == 255 and data.images[3, 1:].max() == 0  # channel 0 is red
    assert "1 of 4 images have channels that differ" in data.notes[0]
    assert load_image_folder(tmp_path, size=None, color="gray").images.shape == (4, 20, 20)


def test_gray_content_in_colour_files_loads_exactly_as_the_gray_decoder_reads_it(tmp_path):
    """Gray data keep today's path: OpenCV's gray decoder, then `resize` (the tensors a gray run trained on)."""
    rng = np.random.default_rng(2)
    for cls in ("a", "b"):
        for i in range(3):
            plane = cv2.GaussianBlur(rng.integers(0, 255, (40, 40), np.uint8), (5, 5), 0)
            write_image(tmp_path / cls / f"{i}.jpg", np.repeat(plane[..., None], 3, axis=2))
    auto = load_image_folder(tmp_path, size=32, color="auto")
    gray = load_image_folder(tmp_path, size=32, color="gray")
    assert auto.color == gray.color == "gray" and "all 6 images have equal channels" in auto.notes[0]
    torch.testing.assert_close(auto.images, gray.images, rtol=0, atol=0)
    by_decoder = [cv2.resize(cv2.imread(str(tmp_path / p), cv2.IMREAD_GRAYSCALE), (32, 32), interpolation=cv2.INTER_AREA)
                  for p in auto.paths]
    np.testing.assert_array_equal(auto.images.numpy(), np.stack(by_decoder))


def test_the_images_own_size_at_least_the_minimum_unless_one_is_given(tmp_path):
    for i in range(3):
        write_image(tmp_path / "a" / f"{i}.png", np.zeros((48, 48), np.uint8))
        write_image(tmp_path / "b" / f"{i}.png", np.zeros((48, 48), np.uint8))
    same = load_image_folder(tmp_path, size=None)
    assert same.size == 48 and same.notes[1] == "size 48×48: the images' own size (all 6 are 48×48)"
    assert load_image_folder(tmp_path, size=64).size == 64
    raised = load_image_folder(tmp_path, size=None, min_size=64)
    assert raised.size == 64 and raised.images.shape == (6, 64, 64)
    assert raised.notes[1] == ("size 64×64: the images' own size (all 6 are 48×48) is 48, below --min-size; "
                               "every image is upsampled")
    assert load_image_folder(tmp_path, size=None, min_size=32).size == 48
    write_image(tmp_path / "b" / "odd.png", np.zeros((30, 40), np.uint8))
    write_image(tmp_path / "b" / "big.png", np.zeros((90, 90), np.uint8))
    mixed = load_image_folder(tmp_path, size=None)
    assert mixed.size == 48 and mixed.images.shape == (8, 48, 48)
    assert "median longest side of 8 images of 3 sizes (6 of 48×48" in mixed.notes[1]


def test_balancing_is_what_was_asked_and_sampling_draws_each_class_equally():
    labels = torch.tensor([0] * 90 + [1] * 10)
    assert balance_note(labels, "none") == "balance none (--balance none; largest/smallest class 9.00)"
    assert balance_note(labels, "loss").startswith("balance loss")
    weights = class_weights(labels, 2)
    assert weights[labels].sum().item() == pytest.approx(100.0) and weights[1] == pytest.approx(9 * weights[0])
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([epoch_order(labels, "sampling", gen) for _ in range(20)])
    assert len(drawn) == 2000 and abs((labels[drawn] == 1).float().mean().item() - 0.5) < 0.05
    order = epoch_order(labels, "none", torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(100))  # a permutation, as without balancing


def test_camera_jitter_takes_colour_and_keeps_gray_unchanged_in_form(tmp_path):
    colour = load_image_folder(hue_folder(tmp_path, {"red": 2, "blue": 2}), size=None, color="auto").images
    out = camera_jitter(colour, torch.Generator().manual_seed(0))
    assert out.shape == colour.shape and out.dtype == torch.uint8
    torch.testing.assert_close(out, camera_jitter(colour, torch.Generator().manual_seed(0)))
    gray = colour[:, 0]
    assert camera_jitter(gray, torch.Generator().manual_seed(0)).shape == gray.shape


def test_neu_cls_loads_as_before_with_the_new_defaults(neu_cls):
    """NEU-CLS (200×200 gray content in 3-channel JPEGs): colour auto and the native size give the 200×200 gray
    tensors of the old fixed path, byte for byte."""
    auto = load_image_folder(neu_cls, size=None, limit_per_class=3, color="auto", min_size=200)
    fixed = load_image_folder(neu_cls, size=200, limit_per_class=3, color="gray")
    assert auto.color == "gray" and auto.size == 200
    torch.testing.assert_close(auto.images, fixed.images, rtol=0, atol=0)
