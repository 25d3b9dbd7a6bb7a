"""Publish a fused checkpoint into a watched model directory, atomically.

A reader of the model directory sees either nothing or a complete, validated version: the
checkpoint is validated, then copied through `stripnet.checkpoint.atomic_directory` (a hidden
temporary directory in DIR itself, so the rename never crosses a filesystem) to
`DIR/<utc stamp>-<model_version>/`. The newest version is the greatest name.
"""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.checkpoint import MANIFEST_NAME
from stripnet.checkpoint import STAMP_FORMAT, CheckpointError, atomic_directory, load_checkpoint, sha256_file, utc_stamp

_STAMP = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)-")


def publish(checkpoint_dir: str | Path, model_dir: str | Path) -> Path:
    """Copy a valid checkpoint into `model_dir` as its newest version; returns the version's directory."""
    src = Path(checkpoint_dir)
    _, manifest = load_checkpoint(src)  # a broken checkpoint never reaches the model directory
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    final = model_dir / f"{_next_stamp(model_dir)}-{manifest.model_version}"
    with atomic_directory(final) as tmp:
        for name in (MANIFEST_NAME, manifest.weights_file):
            shutil.copyfile(src / name, tmp / name)  # umask permissions: readable by the service
        if sha256_file(tmp / manifest.weights_file) != manifest.weights_sha256:
            raise CheckpointError(f"{src}: weights changed while being published; try again")
    return final


def _next_stamp(model_dir: Path) -> str:
    """Now, or just after the newest existing stamp if the clock stepped back: a publish is always newest."""
    now = datetime.now(UTC)
    stamps = [m.group(1) for p in model_dir.iterdir() if (m := _STAMP.match(p.name))]
    if stamps:
        newest = datetime.strptime(max(stamps), STAMP_FORMAT).replace(tzinfo=UTC)
        now = max(now, newest + timedelta(microseconds=1))
    return utc_stamp(now)
