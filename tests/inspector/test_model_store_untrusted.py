"""ModelStore on an untrusted model directory: a hostile version never stops, starves or hangs the store; it is
rejected once its files stop changing, the old model serves on, and a restart skips it (issue 13, items 1-4 and
the slow non-atomic publish of item 8)."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from inspector import model_store
from inspector.app import model_store as build_store
from inspector.cli import parse
from inspector.metrics import Metrics
from inspector.model_store import ModelStore, ReadPolicy
from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, Manifest
from stripnet.budget import CheckpointLimits
from stripnet.network import RepNet
from tests.helpers.harness import peak_rss_bytes, reset_peak_rss
from tests.helpers.hostile import HOSTILE, ISSUE_KINDS
from tests.helpers.metrics import model_reloads
from tests.helpers.models import export_tiny, version_dir_name, with_version

BOUND_BYTES = 600 << 20  # issue 13: peak RSS growth per hostile version


def prepare(model: RepNet, manifest: Manifest) -> RepNet:
    return model


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("good") / "v1", "v1")


@pytest.fixture
def model_dir(tmp_path: Path, good: Path) -> Path:
    """A model directory serving v1 (stamp 1)."""
    models = tmp_path / "models"
    models.mkdir()
    with_version(good, models / version_dir_name(1, "v1"), "v1")
    return models


def store_for(model_dir: Path, metrics: Metrics, **options) -> ModelStore:
    return ModelStore(model_dir, prepare, metrics=metrics, reading=ReadPolicy(CheckpointLimits(), batch=32),
                      **options)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_version_is_rejected_cheaply_and_the_old_model_serves_on(kind, model_dir, good):
    metrics = Metrics()
    store = store_for(model_dir, metrics)
    serving = store.load_initial()
    bad = model_dir / version_dir_name(2, kind)
    HOSTILE[kind].make(good, bad)
    reset_peak_rss(os.getpid())
    before = peak_rss_bytes(os.getpid())

    with capture_logs() as logs:
        for _ in range(4):  # pending at the first look, rejected at the second, never tried again
            assert store.poll() is None

    assert peak_rss_bytes(os.getpid()) - before < BOUND_BYTES
    assert store.current is serving
    [line] = events(logs, "model_rejected")
    assert line["version"] == bad.name and line["serving"] == "v1"
    assert re.search(HOSTILE[kind].reason, line["reason"]), line["reason"]
    assert model_reloads(metrics) == (1, 1)


@pytest.mark.parametrize("kind", ISSUE_KINDS)
def test_start_up_with_a_hostile_newest_version_serves_the_newest_valid_one(kind, model_dir, good):
    HOSTILE[kind].make(good, model_dir / version_dir_name(3, kind))
    with_version(good, model_dir / version_dir_name(2, "v2"), "v2")

    assert store_for(model_dir, Metrics()).load_initial().version == "v2"


def test_a_rejection_is_remembered_across_a_restart(model_dir, good, tmp_path):
    rejects = tmp_path / "state" / "rejects.json"
    bad = model_dir / version_dir_name(3, "huge")
    HOSTILE["blocks_of_1e6_channels"].make(good, bad)
    first = store_for(model_dir, Metrics(), rejects_file=rejects)
    first.load_initial()
    first.poll()  # rejected
    assert rejects.is_file()

    with capture_logs() as logs:  # a restart
        metrics = Metrics()
        restarted = store_for(model_dir, metrics, rejects_file=rejects)
        assert restarted.load_initial().version == "v1"
        assert restarted.poll() is None
    assert events(logs, "model_rejected") == [] and events(logs, "model_pending") == []
    assert model_reloads(metrics) == (1, 0)

    shutil.rmtree(bad)  # a fixed version under the same name is a new version: tried again
    with_version(good, bad, "huge-fixed")
    assert restarted.poll().version == "huge-fixed"


def test_an_unreadable_or_foreign_rejects_file_means_no_rejects(model_dir, tmp_path):
    for content in (b"{not json", b"[1, 2]", b'{"x": {"v": [["a", "b"]]}}', os.urandom(64)):
        rejects = tmp_path / "rejects.json"
        rejects.write_bytes(content)
        assert store_for(model_dir, Metrics(), rejects_file=rejects).load_initial().version == "v1"
    os.mkfifo(tmp_path / "fifo.json")
    assert store_for(model_dir, Metrics(), rejects_file=tmp_path / "fifo.json").load_initial().version == "v1"


def test_a_slow_non_atomic_copy_is_pending_not_rejected_then_serves(model_dir, good):
    metrics = Metrics()
    store = store_for(model_dir, metrics)
    store.load_initial()
    copy = model_dir / version_dir_name(2, "v2")
    copy.mkdir()
    weights = (good / WEIGHTS_NAME).read_bytes()

    with capture_logs() as logs:
        shutil.copy(good / MANIFEST_NAME, copy / MANIFEST_NAME)
        assert store.poll() is None
        for end in range(0, len(weights), len(weights) // 4):  # the weights arrive in four writes, a poll each
            with (copy / WEIGHTS_NAME).open("ab") as f:
                f.write(weights[end:end + len(weights) // 4])
            found = store.poll()
    assert found is not None and found.version == "v1"  # the copy carries v1's manifest
    assert events(logs, "model_rejected") == []
    assert len(events(logs, "model_pending")) == 1  # one line for the whole copy
    assert model_reloads(metrics) == (2, 0)


def test_a_read_that_hangs_is_a_rejection_within_the_timeout(model_dir, good, monkeypatch):
    release = threading.Event()
    real = model_store.load_checkpoint

    def hung_for_v2(path, limits, batch):
        if path.name.endswith("-v2"):
            release.wait()  # a read on a hung filesystem
        return real(path, limits, batch)

    monkeypatch.setattr(model_store, "load_checkpoint", hung_for_v2)
    metrics = Metrics()
    store = ModelStore(model_dir, prepare, metrics=metrics, reading=ReadPolicy(timeout_s=0.3))
    store.load_initial()
    with_version(good, model_dir / version_dir_name(2, "v2"), "v2")
    try:
        with capture_logs() as logs:
            started = time.monotonic()
            assert store.poll() is None
            assert time.monotonic() - started < 5  # the timeout, not the hang
            assert store.poll() is None  # not tried again: no second stuck thread
        [line] = events(logs, "model_rejected")
        assert line["kind"] == "read_timeout" and store.current.version == "v1"
        assert model_reloads(metrics) == (1, 1)
    finally:
        release.set()


def test_a_model_dir_that_turns_into_a_file_warns_once(model_dir, tmp_path):
    store = store_for(model_dir, Metrics())
    store.load_initial()
    shutil.rmtree(model_dir)
    model_dir.write_text("not a directory")
    with capture_logs() as logs:
        for _ in range(3):
            assert store.poll() is None
    assert len(events(logs, "model_dir_unreadable")) == 1


def test_any_exception_from_reading_is_a_rejection_not_a_crash(model_dir, good, monkeypatch):
    """Issue 13, item 1: torch's RuntimeError ("you tried to allocate 36000000000000 bytes") escaped the store's
    `except (CheckpointError, OSError)` and ended the process. Whatever reading raises, the old model serves on."""
    real = model_store.load_checkpoint

    def allocation_fails_for_v2(path, limits, batch):
        if path.name.endswith("-v2"):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 36000000000000 bytes")
        return real(path, limits, batch)

    monkeypatch.setattr(model_store, "load_checkpoint", allocation_fails_for_v2)
    metrics = Metrics()
    store = store_for(model_dir, metrics)
    store.load_initial()
    with_version(good, model_dir / version_dir_name(2, "v2"), "v2")
    with capture_logs() as logs:
        for _ in range(3):
            assert store.poll() is None
    [line] = events(logs, "model_rejected")
    assert line["kind"] == "read_error" and line["reason"].startswith("RuntimeError: DefaultCPUAllocator")
    assert store.current.version == "v1" and model_reloads(metrics) == (1, 1)


@pytest.mark.parametrize("source", ["flag", "environment"])
def test_the_caps_are_settings(source, model_dir, tmp_path, monkeypatch):
    """--model-limits.* and INSPECTOR_MODEL_LIMITS__* reach the store the service builds (inspector.app)."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in [n for n in os.environ if n.startswith("INSPECTOR_")]:
        monkeypatch.delenv(name)
    args = ["run", "--model-dir", str(model_dir), "--model-rejects-file", str(tmp_path / "rejects.json")]
    if source == "flag":
        args += ["--model-limits.max-blocks", "8"]
    else:
        monkeypatch.setenv("INSPECTOR_MODEL_LIMITS__MAX_BLOCKS", "8")
    _, settings = parse(args)

    with capture_logs() as logs, pytest.raises(model_store.NoValidModelError):
        build_store(settings, prepare, Metrics()).load_initial()  # EG-RepVGG has 9 blocks: v1 and the bundled one
    [pending] = events(logs, "model_pending")
    [rejected] = events(logs, "model_rejected")  # the bundled model: no second look
    assert pending["reason"] == rejected["reason"] == "architecture has 9 blocks > limit 8"
