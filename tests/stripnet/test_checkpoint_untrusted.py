"""load_checkpoint on an untrusted directory: every hostile version is a CheckpointError that says why, costs
at most a few MB and returns at once (no FIFO is read, nothing outside the folder, nothing over a cap)."""

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
from stripnet.budget import CheckpointLimits
from stripnet.checkpoint import CheckpointError, load_checkpoint, read_regular
from tests.helpers.harness import peak_rss_bytes, reset_peak_rss
from tests.helpers.hostile import HOSTILE
from tests.helpers.models import export_tiny

BOUND_BYTES = 600 << 20  # issue 13: peak RSS growth per hostile version
STORE_ONLY = {"version_is_a_symlink"}  # a symlinked version is the model store's to refuse; the loader follows it


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("good") / "v1", "v1")


@pytest.mark.parametrize("kind", sorted(HOSTILE.keys() - STORE_ONLY))
def test_a_hostile_version_is_refused_cheaply(kind, good, tmp_path):
    version = tmp_path / "models" / "20260101T000000.000000Z-x"
    version.parent.mkdir()
    HOSTILE[kind].make(good, version)
    reset_peak_rss(os.getpid())
    before = peak_rss_bytes(os.getpid())

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(version, CheckpointLimits(), batch=32)

    assert re.search(HOSTILE[kind].reason, str(raised.value)), str(raised.value)
    assert peak_rss_bytes(os.getpid()) - before < BOUND_BYTES


def test_the_good_checkpoint_loads_under_the_default_limits(good):
    model, manifest = load_checkpoint(good, CheckpointLimits(), batch=32)
    assert manifest.model_version == "v1" and model.is_deploy


def test_weights_file_names_nothing_but_a_file_of_the_folder(good, tmp_path):
    for name in ("/etc/passwd", f"../v1/{WEIGHTS_NAME}", f"sub/{WEIGHTS_NAME}", ".", "..", ""):
        ckpt = tmp_path / f"c{abs(hash(name))}"
        shutil.copytree(good, ckpt)
        doc = json.loads((ckpt / MANIFEST_NAME).read_text()) | {"weights_file": name}
        (ckpt / MANIFEST_NAME).write_text(json.dumps(doc))
        with pytest.raises(CheckpointError, match="not a file name in the checkpoint directory"):
            load_checkpoint(ckpt)


def test_a_symlink_inside_the_folder_is_followed(good, tmp_path):
    ckpt = tmp_path / "linked"
    shutil.copytree(good, ckpt)
    (ckpt / WEIGHTS_NAME).rename(ckpt / "weights-v1.safetensors")
    (ckpt / WEIGHTS_NAME).symlink_to("weights-v1.safetensors")
    assert load_checkpoint(ckpt)[1].model_version == "v1"


def test_read_regular_caps_at_the_edge_and_refuses_what_is_not_a_plain_file(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 100)
    assert read_regular(tmp_path / "f", tmp_path, 100) == b"x" * 100
    with pytest.raises(CheckpointError, match="100 bytes > limit 99"):
        read_regular(tmp_path / "f", tmp_path, 99)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_regular(tmp_path / "fifo", tmp_path, 100)  # returns at once: opened without blocking, then fstat
    (tmp_path / "up").symlink_to(tmp_path.parent)
    with pytest.raises(CheckpointError, match="leads outside"):
        read_regular(tmp_path / "up" / tmp_path.name / "f", tmp_path / "sub", 100)
    with pytest.raises(CheckpointError, match="leads outside"):
        read_regular(tmp_path, tmp_path, 100)  # the folder itself is not a file in it
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", tmp_path, 100)


def test_a_manifest_limit_is_a_setting(good):
    size = (good / MANIFEST_NAME).stat().st_size
    assert load_checkpoint(good, CheckpointLimits(max_manifest_bytes=size))[1].model_version == "v1"
    with pytest.raises(CheckpointError, match=f"{size:,} bytes > limit {size - 1:,}"):
        load_checkpoint(good, CheckpointLimits(max_manifest_bytes=size - 1))
    weights = (good / WEIGHTS_NAME).stat().st_size
    with pytest.raises(CheckpointError, match=f"{weights:,} bytes > limit"):
        load_checkpoint(good, CheckpointLimits(max_weights_bytes=weights - 1))
    with pytest.raises(CheckpointError, match="header of .* > limit 16"):
        load_checkpoint(good, CheckpointLimits(max_header_bytes=16))


def test_the_activation_limit_depends_on_the_batch(good):
    limits = CheckpointLimits(max_activation_bytes=500_000)  # 32×32 inputs: 3·32² + 9·16² floats, 21.5 KB a frame
    assert load_checkpoint(good, limits, batch=16)[1].model_version == "v1"
    with pytest.raises(CheckpointError, match="activation bytes at batch 32"):
        load_checkpoint(good, limits, batch=32)


@pytest.mark.parametrize("name", [MANIFEST_NAME, WEIGHTS_NAME])
def test_a_device_node_in_the_folder_is_not_read(name, good, tmp_path):
    """A character device inside the folder itself (no symbolic link to leave it): /dev/zero's numbers, which
    read for ever. Creating one needs CAP_MKNOD."""
    ckpt = tmp_path / "dev"
    shutil.copytree(good, ckpt)
    (ckpt / name).unlink()
    try:
        os.mknod(ckpt / name, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    with pytest.raises(CheckpointError, match=r"not a regular file \(mode c"):
        load_checkpoint(ckpt)
