"""Publish a fused checkpoint into a watched model directory, atomically.

A reader of the model directory sees either nothing or a complete, validated version: the
checkpoint is validated, copied into `DIR/.tmp-<random>/` (readers ignore dot names), fsynced,
then renamed to `DIR/<UTC yyyymmddTHHMMSS.ffffffZ>-<model_version>/`. The temporary directory lives
in DIR itself, so the rename never crosses a filesystem. The newest version is the greatest name.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.checkpoint import MANIFEST_NAME
from trainer.checkpoint import CheckpointError, fsync_dir, load_checkpoint, sha256_file

TMP_PREFIX = ".tmp-"
STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"
_STAMP = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)-")


def publish(checkpoint_dir: str | Path, model_dir: str | Path) -> Path:
    """Copy a valid checkpoint into `model_dir` as its newest version; returns the version's directory."""
    src = Path(checkpoint_dir)
    _, manifest = load_checkpoint(src)  # a broken checkpoint never reaches the model directory
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    tmp.mkdir()  # not mkdtemp: its 0700 would hide the version from a reader running as another user
    try:
        for name in (MANIFEST_NAME, manifest.weights_file):
            _copy_synced(src / name, tmp / name)
        copied = sha256_file(tmp / manifest.weights_file)
        if copied != manifest.weights_sha256:
            raise CheckpointError(f"{src}: weights changed while being published; try again")
        fsync_dir(tmp)
        final = model_dir / f"{_next_stamp(model_dir)}-{manifest.model_version}"
        _rename_new(tmp, final)
        fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _copy_synced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)  # new file, umask permissions: readable by the service like the directory
    with dst.open("rb") as f:
        os.fsync(f.fileno())


def _next_stamp(model_dir: Path) -> str:
    """Now, or just after the newest existing stamp if the clock stepped back: a publish is always newest."""
    now = datetime.now(UTC)
    stamps = [m.group(1) for p in model_dir.iterdir() if (m := _STAMP.match(p.name))]
    if stamps:
        newest = datetime.strptime(max(stamps), STAMP_FORMAT).replace(tzinfo=UTC)
        now = max(now, newest + timedelta(microseconds=1))
    return now.strftime(STAMP_FORMAT)


def _rename_new(tmp: Path, final: Path) -> None:
    # rename(2) would silently replace an empty directory of that name; a version never replaces another.
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    try:
        tmp.rename(final)
    except OSError as err:
        if final.exists():
            raise FileExistsError(f"{final} already exists") from err
        raise
