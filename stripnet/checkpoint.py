"""Fused checkpoint directories: write atomically, read with validation, never unpickle.

A directory holds `manifest.json` (schemas.checkpoint.Manifest) and a safetensors file. Reading
checks the manifest schema, the weights' sha256 and that the weights fit the declared architecture,
so a corrupt, truncated or tampered checkpoint fails with a `CheckpointError` that says why. Reading
treats the directory as untrusted (a watched model directory is written by others): only regular files
inside it are read, each size-capped, and the architecture's cost is bounded by `CheckpointLimits`
before anything is built from it.

`atomic_directory` is the one way a directory of files appears (a checkpoint here, a published
version in trainer/publish.py): filled under a hidden name beside its final name, synced, renamed.
`utc_stamp` is the one version format: sortable UTC time to the microsecond.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, InputSpec, Manifest
from stripnet.budget import CheckpointError, CheckpointLimits, check_budget
from stripnet.network import RepNet, build_model, reparameterize
from stripnet.profile import count_macs, count_parameters

TMP_PREFIX = ".tmp-"  # readers of a directory of versions ignore names starting with "."
STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"


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
    recipe: dict[str, str | int | float | bool | None] | None = None,
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
            boxes=fused.boxes.spec if fused.boxes is not None else None,
            recipe=recipe or {},
        )
        (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
    return manifest


def rewrite_checkpoint(model: RepNet, model_dir: str | Path, manifest: Manifest) -> Manifest:
    """Replace the checkpoint at `model_dir` by `model` (a fitted detector or head added), every other field of
    its `manifest` kept: written beside it, then two renames, so the directory is complete at every moment
    but the instant between them. Not for a watched directory: publish a new version there instead."""
    model_dir = Path(model_dir)
    staged = model_dir.with_name(f".{model_dir.name}.rewrite")
    shutil.rmtree(staged, ignore_errors=True)
    written = export_checkpoint(
        model, staged, class_names=manifest.class_names, model_name=manifest.model_name,
        model_version=manifest.model_version, input_spec=manifest.input, metrics=manifest.metrics,
        data_fingerprint=manifest.data_fingerprint, teacher=manifest.teacher, notes=manifest.notes,
        recipe=manifest.recipe)
    retired = model_dir.with_name(f".{model_dir.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    model_dir.rename(retired)
    staged.rename(model_dir)
    shutil.rmtree(retired)
    return written


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def _dtype_name(dtype: torch.dtype) -> str:
    return SAFETENSORS_DTYPES.get(dtype, str(dtype))


def read_regular(path: Path, root: Path, max_bytes: int) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `max_bytes` inside directory `root` once
    symbolic links are resolved. Opened without blocking and checked with fstat before any read, so a FIFO,
    a device or a socket is refused instead of read (a FIFO would block the reader for ever); FileNotFoundError
    when it is missing."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise CheckpointError(f"{path}: leads outside {root} (symbolic links must stay inside the checkpoint)")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be opened ({err.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file (mode {stat.filemode(st.st_mode)})")
        if st.st_size > max_bytes:
            raise CheckpointError(f"{path}: {st.st_size:,} bytes > limit {max_bytes:,}")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:  # a regular file: the file object takes the descriptor over
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CheckpointError(f"{path}: grew past the limit of {max_bytes:,} bytes while it was read")
    return data


def read_manifest(ckpt_dir: str | Path, limits: CheckpointLimits = CheckpointLimits()) -> Manifest:
    path = Path(ckpt_dir) / MANIFEST_NAME
    try:
        return Manifest.model_validate_json(read_regular(path, Path(ckpt_dir), limits.max_manifest_bytes))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: no {MANIFEST_NAME}; not a checkpoint directory") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise CheckpointError(f"{path}: invalid manifest at {where}: {first['msg']}") from None


def _network(manifest: Manifest) -> RepNet:
    return build_model(manifest.architecture, len(manifest.class_names), deploy=manifest.deploy, ood=manifest.ood,
                       boxes=manifest.boxes)


def expected_tensors(manifest: Manifest) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name → (dtype, shape) of every tensor the manifest's network holds, from a network built on
    the meta device (shapes without storage). Call after `check_budget`, which bounds its size."""
    with torch.device("meta"):
        network = _network(manifest)
    return {name: (t.dtype, tuple(t.shape)) for name, t in network.state_dict().items()}


def _safetensors_header(data: bytes, max_header_bytes: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Name → (dtype, shape, begin, end) from a safetensors file's header; ValueError if it is malformed."""
    if len(data) < 8:
        raise ValueError("shorter than the 8 bytes that give its header's length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > max_header_bytes:
        raise ValueError(f"header of {length:,} bytes > limit {max_header_bytes:,}")
    if 8 + length > len(data):
        raise ValueError(f"header of {length:,} bytes runs past the end of the file")
    doc = json.loads(data[8:8 + length])
    if not isinstance(doc, dict):
        raise ValueError("header is not a JSON object")
    doc.pop("__metadata__", None)
    out = {}
    for name, entry in doc.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {name!r:.80} has no dtype, shape and data offsets") from None
        if not all(type(v) is int and v >= 0 for v in (*shape, begin, end)) or not isinstance(dtype, str):
            raise ValueError(f"tensor {name!r:.80} has a malformed dtype, shape or offsets")
        out[name] = (dtype, shape, begin, end)
    return out


def _check_weights(data: bytes, manifest: Manifest, limits: CheckpointLimits) -> None:
    """The weights file holds exactly the tensors of the manifest's network (names, dtypes, shapes), packed
    back to back to its end: so loading it allocates what its size says, and building the network no more."""
    try:
        header = _safetensors_header(data, limits.max_header_bytes)
    except ValueError as err:
        raise CheckpointError(f"unreadable safetensors file ({err})") from None
    expected = expected_tensors(manifest)
    problems = [f"{name!r:.80} missing" for name in sorted(expected.keys() - header.keys())]
    problems += [f"{name!r:.80} unexpected" for name in sorted(header.keys() - expected.keys())]
    problems += [f"{name!r:.80} is {header[name][0]}{list(header[name][1])}, expected {_dtype_name(dtype)}{list(shape)}"
                 for name, (dtype, shape) in expected.items()
                 if name in header and header[name][:2] != (_dtype_name(dtype), shape)]
    if problems:
        raise CheckpointError(f"weights do not fit architecture {manifest.architecture.name!r:.80} with "
                              f"{len(manifest.class_names)} classes ({len(problems)} tensors differ: "
                              f"{'; '.join(problems[:3])})")
    offset = 0
    for name, (_, _, begin, end) in sorted(header.items(), key=lambda item: item[1][2]):
        dtype, shape = expected[name]
        if begin != offset or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError("unreadable safetensors file (tensor data is not packed back to back)")
        offset = end
    (length,) = struct.unpack("<Q", data[:8])
    if 8 + length + offset != len(data):
        raise CheckpointError(f"unreadable safetensors file ({len(data):,} bytes, its header accounts for "
                              f"{8 + length + offset:,})")


def load_checkpoint(ckpt_dir: str | Path, limits: CheckpointLimits = CheckpointLimits(),
                    batch: int = 1) -> tuple[RepNet, Manifest]:
    """Validated fused model (eval mode, CPU) and its manifest; raises CheckpointError on any mismatch.

    Cheapest first, and nothing is allocated that the limits do not bound: the manifest (size-capped), the
    architecture's cost against `limits` (arithmetic, `batch` frames per inference), the weights file (a
    regular file in `ckpt_dir`, size-capped), its sha256, its tensors against the architecture's, then the
    network is built and loaded."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir, limits)
    check_budget(manifest, limits, batch)
    name = manifest.weights_file
    if name in ("", ".", "..") or Path(name).name != name:
        raise CheckpointError(f"{ckpt_dir}: weights_file {name!r:.100} is not a file name in the checkpoint directory")
    weights = ckpt_dir / name
    try:
        data = read_regular(weights, ckpt_dir, limits.max_weights_bytes)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: weights file {name} is missing") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest.weights_sha256:
        raise CheckpointError(
            f"{weights}: sha256 {actual[:12]}… does not match the manifest's {manifest.weights_sha256[:12]}…"
        )
    try:
        _check_weights(data, manifest, limits)
        state = load(data)
    except CheckpointError as err:
        raise CheckpointError(f"{weights}: {err}") from None
    except SafetensorError as err:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({err})") from None
    del data
    model = _network(manifest)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        summary = str(err).splitlines()[0]
        raise CheckpointError(f"{weights}: weights do not fit architecture {manifest.architecture.name!r} "
                              f"with {len(manifest.class_names)} classes ({summary})") from None
    return model.eval(), manifest
