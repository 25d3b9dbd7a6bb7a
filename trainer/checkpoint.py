"""Fused checkpoint directories: write atomically, read with validation, never unpickle.

A directory holds `manifest.json` (schemas.checkpoint.Manifest) and a safetensors file. Reading
checks the manifest schema, the weights' sha256 and that the weights fit the declared architecture,
so a corrupt, truncated or tampered checkpoint fails with a `CheckpointError` that says why.
This module imports only the network definition: serving never touches training code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, InputSpec, Manifest
from trainer.nets import RepNet, build_model, reparameterize
from trainer.nets.profile import count_macs, count_parameters


class CheckpointError(ValueError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(root: Path) -> None:
    """Readable by the service's user (mkdtemp makes 0700), and durable before the rename."""
    root.chmod(0o755)
    for path in root.iterdir():
        path.chmod(0o644)
        with path.open("rb") as f:
            os.fsync(f.fileno())
    fsync_dir(root)


def default_version() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def export_checkpoint(
    model: RepNet, out_dir: str | Path, *, class_names: tuple[str, ...], model_name: str,
    model_version: str | None = None, input_spec: InputSpec = InputSpec(), metrics: dict[str, float] | None = None,
    data_fingerprint: str = "", teacher: str | None = None, notes: str = "",
) -> Manifest:
    """Fuse `model` and write it as a checkpoint directory at `out_dir`, atomically (temp dir, then rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new directory")
    fused = reparameterize(model).cpu()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        weights = tmp / WEIGHTS_NAME
        save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, weights)
        manifest = Manifest(
            model_name=model_name, model_version=model_version or default_version(),
            architecture=model.spec, class_names=class_names, input=input_spec,
            weights_sha256=sha256_file(weights), parameters=count_parameters(fused),
            macs=count_macs(fused, input_spec.size, input_spec.channels), metrics=metrics or {},
            data_fingerprint=data_fingerprint, teacher=teacher, created_at=datetime.now(UTC), notes=notes,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
        _seal(tmp)
        tmp.rename(out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(ckpt_dir: str | Path) -> Manifest:
    path = Path(ckpt_dir) / MANIFEST_NAME
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: no {MANIFEST_NAME}; not a checkpoint directory") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise CheckpointError(f"{path}: invalid manifest at {where}: {first['msg']}") from None


def load_checkpoint(ckpt_dir: str | Path) -> tuple[RepNet, Manifest]:
    """Validated fused model (eval mode, CPU) and its manifest; raises CheckpointError on any mismatch."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    weights = ckpt_dir / manifest.weights_file
    if not weights.is_file():
        raise CheckpointError(f"{ckpt_dir}: weights file {manifest.weights_file} is missing")
    actual = sha256_file(weights)
    if actual != manifest.weights_sha256:
        raise CheckpointError(
            f"{weights}: sha256 {actual[:12]}… does not match the manifest's {manifest.weights_sha256[:12]}…"
        )
    try:
        state = load_file(weights)
    except SafetensorError as err:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({err})") from None
    model = build_model(manifest.architecture, len(manifest.class_names), deploy=manifest.deploy)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        summary = str(err).splitlines()[0]
        raise CheckpointError(f"{weights}: weights do not fit architecture {manifest.architecture.name!r} "
                              f"with {len(manifest.class_names)} classes ({summary})") from None
    return model.eval(), manifest


def load_state(path: Path) -> dict:
    """Training state (`last.pt`/`best.pt`): tensors and plain containers only, never arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)
