from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from trainer.data import (
    ImageReadError, dihedral, dihedral_batch, load_image_folder, load_split, save_split, stratified_split,
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
