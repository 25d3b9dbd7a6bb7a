"""`trainer publish`: a validated checkpoint appears in the model directory whole, under a newer name, or not at all."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
from stripnet.checkpoint import CheckpointError, load_checkpoint, sha256_file
from trainer.cli import main
from trainer.publish import publish

from tests.helpers.models import export_tiny

VERSION_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-(?P<version>[A-Za-z0-9._-]+)$")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("ckpt") / "model", "v1")


@pytest.fixture
def broken(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint whose weights lost a byte in the middle (the manifest's sha no longer fits)."""
    out = tmp_path / "broken"
    shutil.copytree(checkpoint, out)
    weights = out / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return out


def visible(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if not p.name.startswith("."))


def test_publish_copies_a_loadable_version_under_a_versioned_name(checkpoint: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"  # created on demand
    published = publish(checkpoint, model_dir)

    assert published.parent == model_dir
    assert VERSION_NAME.match(published.name)["version"] == "v1"
    assert os.listdir(model_dir) == [published.name]  # no temporary directory left behind
    assert sorted(os.listdir(published)) == [MANIFEST_NAME, WEIGHTS_NAME]
    assert sha256_file(published / WEIGHTS_NAME) == sha256_file(checkpoint / WEIGHTS_NAME)
    _, manifest = load_checkpoint(published)
    assert manifest.model_version == "v1"


def test_each_publish_sorts_after_the_previous_one(checkpoint: Path, tmp_path: Path) -> None:
    names = [publish(checkpoint, tmp_path).name for _ in range(4)]

    assert names == sorted(names)
    assert len(set(names)) == 4
    assert visible(tmp_path) == names


def test_publish_is_newest_even_when_the_clock_is_behind_an_existing_version(checkpoint: Path, tmp_path: Path) -> None:
    future = tmp_path / "29991231T235959.999998Z-v0"
    shutil.copytree(checkpoint, future)

    published = publish(checkpoint, tmp_path)

    assert published.name == "29991231T235959.999999Z-v1"
    assert visible(tmp_path)[-1] == published.name


def test_publish_refuses_a_broken_checkpoint_and_leaves_nothing(broken: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    model_dir.mkdir()

    with pytest.raises(CheckpointError, match="sha256"):
        publish(broken, model_dir)
    assert os.listdir(model_dir) == []


def test_publish_refuses_a_directory_without_manifest(checkpoint: Path, tmp_path: Path) -> None:
    src = tmp_path / "half"
    src.mkdir()
    shutil.copy(checkpoint / WEIGHTS_NAME, src)

    with pytest.raises(CheckpointError, match="no manifest.json"):
        publish(src, tmp_path / "models")


def test_only_hidden_names_exist_until_the_rename(checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshot the directory at every fsync: before the rename a reader can see nothing but dot names."""
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    snapshots: list[list[str]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        snapshots.append(os.listdir(model_dir))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    published = publish(checkpoint, model_dir)

    # two files and the temporary directory are synced before the rename, the model directory after it
    assert len(snapshots) >= 4
    before_rename, after_rename = snapshots[:-1], snapshots[-1]
    assert all(name.startswith(".tmp-") for snap in before_rename for name in snap)
    assert after_rename == [published.name]


def test_a_failure_mid_publish_leaves_nothing(checkpoint: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        publish(checkpoint, tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_concurrent_reader_only_ever_sees_complete_versions(checkpoint: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    done = threading.Event()
    loaded: set[str] = set()
    errors: list[Exception] = []

    def reader() -> None:
        while not done.is_set():
            for name in visible(tmp_path):
                try:
                    load_checkpoint(tmp_path / name)
                    loaded.add(name)
                except Exception as err:  # any failure is a visible half-written version
                    errors.append(err)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        published = [publish(checkpoint, tmp_path).name for _ in range(5)]
    finally:
        done.set()
        thread.join()

    assert errors == []
    assert loaded <= set(published)


def test_cli_publish(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", str(checkpoint), "--model-dir", str(tmp_path)]) == 0

    [name] = visible(tmp_path)
    assert str(tmp_path / name) in capsys.readouterr().out


def test_cli_publish_reports_a_broken_checkpoint(broken: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "models"

    assert main(["publish", str(broken), "--model-dir", str(model_dir)]) == 2

    err = capsys.readouterr().err
    assert err.startswith("trainer publish: error:") and "sha256" in err
    assert not model_dir.exists() or os.listdir(model_dir) == []


def test_cli_publish_runs_without_the_training_extras(checkpoint: Path, tmp_path: Path) -> None:
    """The runtime image has no tqdm, matplotlib or torchvision (pyproject's `train` and `bench` extras)."""
    blocked = ("tqdm", "matplotlib", "torchvision")
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); from trainer.cli import main; "
            f"sys.exit(main(['publish', {str(checkpoint)!r}, '--model-dir', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(visible(tmp_path)) == 1
