"""Hostile model versions: every way a version directory can try to crash, starve or hang the inspector, each
with the rejection it must get.

`HOSTILE[kind].make(good, dst)` writes version directory `dst` from the valid checkpoint `good` (any
tests.helpers.models checkpoint); `reason` is a regex the store's rejection reason must match. Most keep the
weights and their sha256, so only the manifest's claims or the files' nature are hostile: a loader that
trusted the manifest would build what it declares. Kinds from issue 13 come first; the rest go further.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
from stripnet.checkpoint import sha256_file

SPARSE_BYTES = 3 << 30  # a 3 GiB file that takes no disk: truncate() past the end


@dataclass(frozen=True)
class Hostile:
    make: Callable[[Path, Path], None]
    reason: str  # regex of the rejection reason


def _doc(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text())


def _copy_with(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    """The good checkpoint with its manifest edited (the weights and their sha256 untouched)."""
    def make(good: Path, dst: Path) -> None:
        shutil.copytree(good, dst)
        doc = _doc(dst)
        edit(doc)
        (dst / MANIFEST_NAME).write_text(json.dumps(doc))
    return make


def _blocks(*widths: int) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        doc["architecture"]["blocks"] = [{"out_channels": w, "stride": 2} for w in widths]
    return edit


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


def _replace_file(name: str, replace: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    """The good checkpoint with file `name` replaced by whatever `replace(path)` puts there."""
    def make(good: Path, dst: Path) -> None:
        shutil.copytree(good, dst)
        (dst / name).unlink()
        replace(dst / name)
    return make


def _sparse(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(SPARSE_BYTES)


def _weights_edited(edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Callable[[Path, Path], None]:
    """The good checkpoint with its tensors edited and the manifest's sha256 re-sealed to match."""
    def make(good: Path, dst: Path) -> None:
        shutil.copytree(good, dst)
        save_file(edit(load_file(dst / WEIGHTS_NAME)), dst / WEIGHTS_NAME)
        _reseal(dst)
    return make


def _reseal(dst: Path) -> None:
    doc = _doc(dst)
    doc["weights_sha256"] = sha256_file(dst / WEIGHTS_NAME)
    (dst / MANIFEST_NAME).write_text(json.dumps(doc))


def _huge_header(good: Path, dst: Path) -> None:
    """A safetensors file whose 8-byte header length says 2**60 bytes, re-sealed."""
    shutil.copytree(good, dst)
    data = bytearray((dst / WEIGHTS_NAME).read_bytes())
    data[:8] = (1 << 60).to_bytes(8, "little")
    (dst / WEIGHTS_NAME).write_bytes(bytes(data))
    _reseal(dst)


def _trailing_bytes(good: Path, dst: Path) -> None:
    shutil.copytree(good, dst)
    with (dst / WEIGHTS_NAME).open("ab") as f:
        f.write(b"\0" * 4096)
    _reseal(dst)


def _borrowed_weights(good: Path, dst: Path) -> None:
    """weights_file names an older sibling version's weights; its own folder holds none."""
    sibling = dst.with_name(f"00000000-sibling-of-{dst.name}")  # sorts before any stamp: an older version
    shutil.copytree(good, sibling)
    shutil.copytree(good, dst)
    (dst / WEIGHTS_NAME).unlink()
    _set("weights_file", f"../{sibling.name}/{WEIGHTS_NAME}")(doc := _doc(dst))
    (dst / MANIFEST_NAME).write_text(json.dumps(doc))


def _weights_symlink_out(good: Path, dst: Path) -> None:
    """model.safetensors is a symbolic link to a copy of the weights outside the version folder."""
    outside = dst.with_name(f".{dst.name}-outside")
    shutil.copytree(good, outside)
    shutil.copytree(good, dst)
    (dst / WEIGHTS_NAME).unlink()
    (dst / WEIGHTS_NAME).symlink_to(outside / WEIGHTS_NAME)


def _version_symlink(good: Path, dst: Path) -> None:
    """The version entry itself is a symbolic link to a valid checkpoint elsewhere."""
    target = dst.with_name(f".{dst.name}-target")
    shutil.copytree(good, target)
    dst.symlink_to(target, target_is_directory=True)


def _deep_json(good: Path, dst: Path) -> None:
    shutil.copytree(good, dst)
    text = (dst / MANIFEST_NAME).read_text()
    (dst / MANIFEST_NAME).write_text(text[:-1] + ', "notes": ' + "[" * 100_000 + "]" * 100_000 + "}")


HOSTILE: dict[str, Hostile] = {
    # issue 13, item 1 and 2: the manifest declares a huge network, the weights (and their sha256) stay
    "blocks_of_1e6_channels": Hostile(_copy_with(_blocks(1_000_000, 1_000_000)), r"parameters > limit"),
    "blocks_of_8000_channels": Hostile(_copy_with(_blocks(8_000, 8_000)), r"parameters > limit"),
    "20000_blocks_of_64": Hostile(_copy_with(lambda d: _set("architecture.blocks",
                                                            [{"out_channels": 64, "stride": 1}] * 20_000)(d)),
                                  r"20,000 blocks > limit"),
    "sparse_3gib_manifest": Hostile(_replace_file(MANIFEST_NAME, _sparse), r"3,221,225,472 bytes > limit"),
    "manifest_to_dev_zero": Hostile(_replace_file(MANIFEST_NAME, lambda p: p.symlink_to("/dev/zero")),
                                    r"leads outside"),
    # item 3
    "manifest_fifo": Hostile(_replace_file(MANIFEST_NAME, os.mkfifo), r"not a regular file"),
    # item 4
    "weights_file_etc_passwd": Hostile(_copy_with(_set("weights_file", "/etc/passwd")), r"not a file name"),
    "weights_file_other_version": Hostile(_borrowed_weights, r"not a file name"),
    # further
    "weights_fifo": Hostile(_replace_file(WEIGHTS_NAME, os.mkfifo), r"not a regular file"),
    "sparse_3gib_weights": Hostile(_replace_file(WEIGHTS_NAME, _sparse), r"3,221,225,472 bytes > limit"),
    "weights_symlink_outside": Hostile(_weights_symlink_out, r"leads outside"),
    "manifest_is_a_directory": Hostile(_replace_file(MANIFEST_NAME, lambda p: p.mkdir()), r"not a regular file"),
    "version_is_a_symlink": Hostile(_version_symlink, r"symbolic link"),
    "input_100000_pixels_square": Hostile(_copy_with(_set("input.size", 100_000)), r"MACs per image > limit"),
    "eca_kernel_of_1e9": Hostile(_copy_with(_set("architecture.eca_kernel_size", 1_000_000_001)),
                                 r"parameters > limit"),
    "channels_do_not_match": Hostile(_copy_with(_set("architecture.in_channels", 1)), r"takes 1 channels"),
    "64_blocks_of_1": Hostile(_copy_with(lambda d: _set("architecture.blocks",
                                                        [{"out_channels": 1, "stride": 1}] * 64)(d)),
                              r"weights do not fit"),
    "50000_classes": Hostile(_copy_with(_set("class_names", [f"c{i}" for i in range(50_000)])),
                             r"weights do not fit"),
    "header_length_2e60": Hostile(_huge_header, r"header of [\d,]+ bytes > limit"),
    "float64_weights": Hostile(_weights_edited(lambda s: {k: v.double() if v.is_floating_point() else v
                                                         for k, v in s.items()}), r"is F64\[.*expected F32"),
    "extra_tensor": Hostile(_weights_edited(lambda s: s | {"payload": torch.zeros(1000)}), r"unexpected"),
    "trailing_bytes": Hostile(_trailing_bytes, r"header accounts for"),
    "deeply_nested_json": Hostile(_deep_json, r"invalid manifest"),
}

ISSUE_KINDS = ("blocks_of_1e6_channels", "blocks_of_8000_channels", "20000_blocks_of_64", "sparse_3gib_manifest",
               "manifest_to_dev_zero", "manifest_fifo", "weights_file_etc_passwd", "weights_file_other_version")
