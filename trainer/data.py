"""Image folders → an in-memory uint8 set → a stratified, seeded split → normalized batches.

NEU-CLS is 1620 images of 200×200 gray (≈65 MB as uint8), so the whole set lives in memory and
augmentation runs on batched tensors; no DataLoader workers are needed on a 2-core machine.

Augmentation is the dihedral group D4 (4 rotations × optional flip): strip-surface texture has no
preferred orientation, and the 8 variants are a fixed, finite set, so a teacher's logits can be
cached for every variant and distillation stays exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from stripnet.preprocess import resize

IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff"}
DIHEDRAL = 8


class ImageReadError(ValueError):
    pass


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # (N, H, W) uint8, gray
    labels: torch.Tensor  # (N,) int64
    class_names: tuple[str, ...]
    paths: tuple[str, ...]  # relative to the root, for split files and error messages

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: list[int] | torch.Tensor) -> ImageSet:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx], self.class_names, tuple(self.paths[i] for i in idx))


def read_gray(path: Path, size: int) -> np.ndarray:
    """Any image OpenCV reads → 8-bit gray at size×size; a clear error naming the file otherwise."""
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if image is None:
        raise ImageReadError(f"cannot read image {path}: not a decodable image file")
    return resize(image, size)


def class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise ValueError(f"{root} needs one sub-folder per class (at least 2), found {len(folders)}")
    return folders


def load_image_folder(root: str | Path, size: int = 200, limit_per_class: int | None = None) -> ImageSet:
    """Every image under root/<class>/ (sorted), or only the first `limit_per_class` of each class."""
    root = Path(root)
    images, labels, paths = [], [], []
    folders = class_folders(root)
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for path in files[:limit_per_class]:
            images.append(read_gray(path, size))
            labels.append(label)
            paths.append(str(path.relative_to(root)))
    return ImageSet(
        images=torch.from_numpy(np.stack(images)),
        labels=torch.tensor(labels, dtype=torch.long),
        class_names=tuple(f.name for f in folders),
        paths=tuple(paths),
    )


def fingerprint(data: ImageSet) -> str:
    """sha256 over paths, labels and pixels: two runs on the same data share it."""
    h = hashlib.sha256()
    for path, label in zip(data.paths, data.labels.tolist(), strict=True):
        h.update(f"{path}\0{label}\n".encode())
    h.update(data.images.numpy().tobytes())
    return h.hexdigest()


def stratified_split(labels: torch.Tensor, fractions: tuple[float, ...], seed: int) -> list[list[int]]:
    """Per class, shuffle with `seed` and cut by `fractions` (e.g. 0.8/0.1/0.1); indices sorted per part."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for cls in labels.unique().tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        bounds = np.rint(np.cumsum((0.0, *fractions)) * len(idx)).astype(int)
        for part, lo, hi in zip(parts, bounds[:-1], bounds[1:], strict=True):
            part.extend(idx[lo:hi])
    return [sorted(p) for p in parts]


SPLIT_NAMES = ("train", "val", "test")


def save_split(path: Path, data: ImageSet, parts: list[list[int]], seed: int) -> None:
    doc = {"seed": seed, "class_names": data.class_names}
    doc |= {name: [data.paths[i] for i in part] for name, part in zip(SPLIT_NAMES, parts)}
    path.write_text(json.dumps(doc, indent=1))


def load_split(path: Path, data: ImageSet) -> list[list[int]]:
    doc = json.loads(path.read_text())
    where = {p: i for i, p in enumerate(data.paths)}
    try:
        return [[where[p] for p in doc[name]] for name in SPLIT_NAMES if name in doc]
    except KeyError as err:
        raise ValueError(f"split file {path} names {err.args[0]!r}, which is not in the data") from None


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element k (0..7) of D4 on the last two dims: k % 4 quarter turns, then a flip when k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def dihedral_batch(x: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for k in ks.unique().tolist():
        sel = ks == k
        out[sel] = dihedral(x[sel], k)
    return out


def camera_jitter(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What a line camera varies between frames, drawn per image: (N, H, W) uint8 → (N, H, W) uint8.

    Exposure (brightness ±0.08, contrast ×0.8–1.25 about the image mean, gamma ×0.8–1.25), focus (a 3×3
    Gaussian blur on a quarter of the images) and mounting (shift up to ±4 % of the side, scale ±7 %,
    reflected at the border).
    """
    n = len(images)
    u = lambda lo, hi: torch.empty(n, 1, 1, 1).uniform_(lo, hi, generator=gen)  # noqa: E731
    x = images.unsqueeze(1).float().div_(255.0)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * u(0.8, 1.25) + mean + u(-0.08, 0.08)).clamp_(0.0, 1.0)
    x = x.pow_(torch.exp(u(-0.22, 0.22)))
    blurred = torch.rand(n, generator=gen) < 0.25
    if blurred.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
        x[blurred] = torch.nn.functional.conv2d(torch.nn.functional.pad(x[blurred], (1, 1, 1, 1), mode="reflect"), kernel)
    scale = u(0.93, 1.07).view(n)
    shift = torch.empty(n, 2).uniform_(-0.08, 0.08, generator=gen)  # normalized coordinates span 2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return x.squeeze(1).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
