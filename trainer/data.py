"""Image folders → an in-memory uint8 set → a stratified, seeded split → normalized batches.

The data decide the input unless told otherwise: colour (RGB, in that order) when any image's channels
differ, gray otherwise; and the images' own side when they share one size (the median longest side
when they do not), upsampled to a minimum side when smaller. Gray is decoded by OpenCV's own gray decoder, the same one the inspector uses.

NEU-CLS is 1620 images of 200×200 gray (≈65 MB as uint8), so the whole set lives in memory and
augmentation runs on batched tensors; no DataLoader workers are needed on a 2-core machine.

Augmentation is the dihedral group D4 (4 rotations × optional flip): strip-surface texture has no
preferred orientation, and the 8 variants are a fixed, finite set, so a teacher's logits can be
cached for every variant and distillation stays exact.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch

from schemas.checkpoint import Color
from stripnet.preprocess import planes, resize

IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff"}
DIHEDRAL = 8
ColorChoice = Literal["auto", "gray", "rgb"]


class ImageReadError(ValueError):
    pass


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # (N, S, S) uint8 gray, or (N, 3, S, S) uint8 RGB
    labels: torch.Tensor  # (N,) int64
    class_names: tuple[str, ...]
    paths: tuple[str, ...]  # relative to the root, for split files and error messages
    color: Color = "gray"
    notes: tuple[str, ...] = ()  # how the images became this set (colour, size), for the run log

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, idx: list[int] | torch.Tensor) -> ImageSet:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return replace(self, images=self.images[idx], labels=self.labels[idx], paths=tuple(self.paths[i] for i in idx))


def read_image(path: Path, color: Color = "gray") -> np.ndarray:
    """Any image OpenCV reads → 8-bit (H, W) gray or (H, W, 3) RGB at its own size; an error naming the file."""
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE if color == "gray" else cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageReadError(f"cannot read image {path}: not a decodable image file")
    return image if color == "gray" else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_gray(path: Path, size: int) -> np.ndarray:
    """Any image OpenCV reads → 8-bit gray at size×size."""
    return resize(read_image(path, "gray"), size)


def has_color(image: np.ndarray) -> bool:
    """True when an (H, W, 3) image's channels differ anywhere."""
    return image.ndim == 3 and not (np.array_equal(image[..., 0], image[..., 1])
                                    and np.array_equal(image[..., 1], image[..., 2]))


def choose_color(images: list[np.ndarray], choice: ColorChoice) -> tuple[Color, str]:
    """`choice` unless "auto"; then RGB when any image has colour. Returns the colour and why."""
    if choice != "auto":
        return choice, f"colour {choice} (--color {choice})"
    coloured = sum(has_color(image) for image in images)
    if coloured:
        return "rgb", f"colour rgb: {coloured} of {len(images)} images have channels that differ"
    return "gray", f"colour gray: all {len(images)} images have equal channels"


def choose_size(shapes: list[tuple[int, int]], size: int | None, min_size: int = 0) -> tuple[int, str]:
    """`size` when given; else the images' own side (the side of a shared square size, else the median longest
    side), raised to `min_size` when smaller."""
    if size is not None:
        return size, f"size {size}×{size} (--size {size})"
    counts = Counter(shapes)
    native = sorted(max(shape) for shape in shapes)[len(shapes) // 2]
    if len(counts) == 1:
        h, w = shapes[0]
        source = f"the images' own size (all {len(shapes)} are {h}×{w})"
    else:
        common = ", ".join(f"{n} of {h}×{w}" for (h, w), n in counts.most_common(3))
        source = (f"the median longest side of {len(shapes)} images of {len(counts)} sizes "
                  f"({common}{', …' if len(counts) > 3 else ''})")
    if native < min_size:
        return min_size, f"size {min_size}×{min_size}: {source} is {native}, below --min-size; every image is upsampled"
    return native, f"size {native}×{native}: {source}" + ("" if len(counts) == 1 else "; every image is resized to it")


def class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise ValueError(f"{root} needs one sub-folder per class (at least 2), found {len(folders)}")
    return folders


def load_image_folder(root: str | Path, size: int | None = 200, limit_per_class: int | None = None,
                      color: ColorChoice = "gray", min_size: int = 0) -> ImageSet:
    """Every image under root/<class>/ (sorted), or only the first `limit_per_class` of each class.

    `size` None takes the images' own size, at least `min_size` (`choose_size`); `color` "auto" their colour
    (`choose_color`)."""
    root = Path(root)
    files, labels = [], []
    folders = class_folders(root)
    for label, folder in enumerate(folders):
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += found[:limit_per_class]
        labels += [label] * len(found[:limit_per_class])
    images = [read_image(path, "gray" if color == "gray" else "rgb") for path in files]
    chosen, color_note = choose_color(images, color)
    if chosen == "gray" and color != "gray":
        images = [read_image(path, "gray") for path in files]  # the gray decoder, exactly as with --color gray
    side, size_note = choose_size([image.shape[:2] for image in images], size, min_size)
    return ImageSet(
        images=torch.from_numpy(np.stack([planes(resize(image, side)) for image in images])),
        labels=torch.tensor(labels, dtype=torch.long),
        class_names=tuple(f.name for f in folders),
        paths=tuple(str(path.relative_to(root)) for path in files),
        color=chosen, notes=(color_note, size_note),
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
    """What a line camera varies between frames, drawn per image: (N, H, W) gray or (N, 3, H, W) RGB uint8, kept.

    Exposure (brightness ±0.08, contrast ×0.8–1.25 about the image mean, gamma ×0.8–1.25), focus (a 3×3
    Gaussian blur on a quarter of the images) and mounting (shift up to ±4 % of the side, scale ±7 %,
    reflected at the border).
    """
    n = len(images)
    u = lambda lo, hi: torch.empty(n, 1, 1, 1).uniform_(lo, hi, generator=gen)  # noqa: E731
    x = (images.unsqueeze(1) if images.ndim == 3 else images).float().div_(255.0)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * u(0.8, 1.25) + mean + u(-0.08, 0.08)).clamp_(0.0, 1.0)
    x = x.pow_(torch.exp(u(-0.22, 0.22)))
    blurred = torch.rand(n, generator=gen) < 0.25
    if blurred.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3).expand(x.shape[1], 1, 3, 3)
        x[blurred] = torch.nn.functional.conv2d(torch.nn.functional.pad(x[blurred], (1, 1, 1, 1), mode="reflect"),
                                                kernel, groups=x.shape[1])
    scale = u(0.93, 1.07).view(n)
    shift = torch.empty(n, 2).uniform_(-0.08, 0.08, generator=gen)  # normalized coordinates span 2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return x.squeeze(1) if images.ndim == 3 else x


Balance = Literal["none", "sampling", "loss"]
IMBALANCED = 1.5  # largest class / smallest class above which the best epoch is chosen by macro-F1


def imbalance(labels: torch.Tensor) -> float:
    """Largest class count over the smallest (1.0 for balanced classes)."""
    counts = torch.bincount(labels)
    counts = counts[counts > 0]
    return float(counts.max() / counts.min())


def balance_note(labels: torch.Tensor, balance: Balance) -> str:
    """The run log's line on imbalance: the balancing used and the largest/smallest class ratio."""
    return f"balance {balance} (--balance {balance}; largest/smallest class {imbalance(labels):.2f})"


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class N / (C · n_c): every class carries the same total weight, and the mean weight per image is 1."""
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).float()
    return len(labels) / (num_classes * counts)


def epoch_order(labels: torch.Tensor, balance: str, gen: torch.Generator) -> torch.Tensor:
    """One epoch's image indices: a permutation, or with "sampling" as many draws with replacement, each class
    equally likely (so a rare class's images repeat and a common class's are sub-sampled)."""
    if balance != "sampling":
        return torch.randperm(len(labels), generator=gen)
    weights = class_weights(labels, int(labels.max()) + 1)[labels]
    return torch.multinomial(weights, len(labels), replacement=True, generator=gen)
