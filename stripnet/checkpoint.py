"""Fused checkpoint directories: write atomically, read with validation, never unpickle.

A directory holds `manifest.json` (schemas.checkpoint.Manifest) and a safetensors file. Reading
checks the manifest schema, the weights' sha256 and that the weights fit the declared architecture,
so a corrupt, truncated or tampered checkpoint fails with a `CheckpointError` that says why.

`atomic_directory` is the one way a directory of files appears (a checkpoint here, a published
version in trainer/publish.py): filled under a hidden name beside its final name, synced, renamed.
`utc_stamp` is the one version format: sortable UTC time to the microsecond.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, InputSpec, Manifest
from stripnet.network import RepNet, build_model, reparameterize
from stripnet.profile import count_macs, count_parameters

TMP_PREFIX = ".tmp-"  # readers of a directory of versions ignore names starting with "."
STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"


class CheckpointError(ValueError):
    pass


def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime(STAMP_FORMAT)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yields an empty hidden directory beside `final`; when the block ends, its files and the directory are
    fsynced, it is renamed to `final` and the parent fsynced. A reader sees nothing or everything; on any
    error the temporary directory is removed. An existing `final` is never replaced."""
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} exists; choose a new directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    tmp.mkdir()  # not mkdtemp: its 0700 would hide the directory from a reader running as another user
    try:
        yield tmp
        for path in tmp.iterdir():
            _fsync(path)
        _fsync(tmp)
        _rename_new(tmp, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_new(tmp: Path, final: Path) -> None:
    # rename(2) would silently replace an empty directory of that name; a directory never replaces another.
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    try:
        tmp.rename(final)
    except OSError as err:
        if final.exists():
            raise FileExistsError(f"{final} already exists") from err
        raise


def export_checkpoint(
    model: RepNet, out_dir: str | Path, *, class_names: tuple[str, ...], model_name: str,
    model_version: str | None = None, input_spec: InputSpec = InputSpec(), metrics: dict[str, float] | None = None,
    data_fingerprint: str = "", teacher: str | None = None, notes: str = "",
) -> Manifest:
    """Fuse `model` (with its unknown detector, if it carries one) and write it as a checkpoint directory at
    `out_dir`, atomically."""
    fused = reparameterize(model).cpu()
    if fused.ood is not None and fused.ood.spec is None:
        raise ValueError("the model's unknown detector has no calibrated threshold (stripnet.ood.with_detector)")
    with atomic_directory(Path(out_dir)) as tmp:
        weights = tmp / WEIGHTS_NAME
        save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, weights)
        manifest = Manifest(
            model_name=model_name, model_version=model_version or utc_stamp(),
            architecture=model.spec, class_names=class_names, input=input_spec,
            weights_sha256=sha256_file(weights), parameters=count_parameters(fused),
            macs=count_macs(fused, input_spec.size, input_spec.channels), metrics=metrics or {},
            data_fingerprint=data_fingerprint, teacher=teacher, created_at=datetime.now(UTC), notes=notes,
            ood=fused.ood.spec if fused.ood is not None else None,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
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
    model = build_model(manifest.architecture, len(manifest.class_names), deploy=manifest.deploy, ood=manifest.ood)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        summary = str(err).splitlines()[0]
        raise CheckpointError(f"{weights}: weights do not fit architecture {manifest.architecture.name!r} "
                              f"with {len(manifest.class_names)} classes ({summary})") from None
    return model.eval(), manifest
