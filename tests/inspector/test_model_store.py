"""ModelStore: the newest valid version serves; a broken one is rejected once, logged, counted; the old one stays."""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from inspector import model_store
from inspector.model_store import ModelStore, NoValidModelError, ServingModel
from inspector.metrics import Metrics
from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, InputSpec, Manifest
from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import export_checkpoint, read_manifest, sha256_file
from stripnet.network import RepNet, build_model
from tests.helpers.metrics import model_reloads
from trainer.publish import publish

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
BATCH_SIZES = (1, 3)


# -- a fake runner loader -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runner:
    model: RepNet
    warmed_batch_sizes: tuple[int, ...]


def prepare(model: RepNet, manifest: Manifest) -> Runner:
    """What the engine's prepare promises: a warm-up at every batch size, ValueError on non-finite outputs."""
    spec = manifest.input
    with torch.inference_mode():
        for n in BATCH_SIZES:
            out = model(torch.rand(n, spec.channels, spec.size, spec.size))
            if not torch.isfinite(out).all():
                raise ValueError(f"non-finite outputs at batch size {n}")
    return Runner(model, BATCH_SIZES)


def serving_version(metrics: Metrics) -> str | None:
    return metrics.health().model_version


# -- checkpoints -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base") / "model"
    export_checkpoint(build_model(EG_REPVGG, 6), out, class_names=CLASSES, model_name="t", model_version="base",
                      input_spec=InputSpec(size=32))
    return out


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Well-formed, with a correct sha256, but its weights hold a NaN: only a warm-up can tell."""
    model = build_model(EG_REPVGG, 6)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    out = tmp_path_factory.mktemp("nan") / "model"
    export_checkpoint(model, out, class_names=CLASSES, model_name="t", model_version="nan",
                      input_spec=InputSpec(size=32))
    return out


@pytest.fixture
def variant(base: Path, tmp_path: Path) -> Callable[..., Path]:
    """The base checkpoint under another version (and class names): the manifest is not covered by the sha."""
    def make(version: str, class_names: tuple[str, ...] = CLASSES) -> Path:
        out = tmp_path / "variants" / version
        shutil.copytree(base, out)
        write_manifest(out, read_manifest(out).model_copy(update={"model_version": version,
                                                                  "class_names": class_names}))
        return out
    return make


def write_manifest(ckpt: Path, manifest: Manifest) -> None:
    (ckpt / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def store(model_dir: Path, metrics: Metrics) -> ModelStore[Runner]:
    return ModelStore(model_dir, prepare, metrics=metrics)


@pytest.fixture
def nothing_bundled(monkeypatch: pytest.MonkeyPatch) -> None:
    def resolve(model: str) -> Path:
        raise FileNotFoundError("no model is bundled with this package yet")
    monkeypatch.setattr(model_store, "resolve_model_dir", resolve)


@pytest.fixture
def bundled(monkeypatch: pytest.MonkeyPatch, variant: Callable[..., Path]) -> Path:
    path = variant("bundled")
    monkeypatch.setattr(model_store, "resolve_model_dir", lambda model: path)
    return path


def rejections(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] == "model_rejected"]


def pending(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] == "model_pending"]


# -- ways a version can be broken ------------------------------------------------------------------------


def _flip_a_weights_byte(v: Path) -> None:
    data = bytearray((v / WEIGHTS_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (v / WEIGHTS_NAME).write_bytes(bytes(data))


def _truncate_weights(v: Path) -> None:
    with (v / WEIGHTS_NAME).open("r+b") as f:
        f.truncate(os.path.getsize(v / WEIGHTS_NAME) // 2)


def _reseal(v: Path) -> None:
    """Make the manifest's sha256 match whatever the weights now are."""
    write_manifest(v, read_manifest(v).model_copy(update={"weights_sha256": sha256_file(v / WEIGHTS_NAME)}))


def _garbage_header_resealed(v: Path) -> None:
    with (v / WEIGHTS_NAME).open("r+b") as f:
        f.write(b"\xff" * 64)
    _reseal(v)


def _truncated_resealed(v: Path) -> None:
    _truncate_weights(v)
    _reseal(v)


def _wrong_sha(v: Path) -> None:
    write_manifest(v, read_manifest(v).model_copy(update={"weights_sha256": "0" * 64}))


def _five_classes_for_six_outputs(v: Path) -> None:
    write_manifest(v, read_manifest(v).model_copy(update={"class_names": CLASSES[:5]}))


def _half_written_manifest(v: Path) -> None:
    text = (v / MANIFEST_NAME).read_text()
    (v / MANIFEST_NAME).write_text(text[: len(text) // 2])


BREAKAGES = {
    "corrupt weights": (_flip_a_weights_byte, "sha256"),
    "corrupt weights, sha resealed": (_garbage_header_resealed, "unreadable safetensors"),
    "truncated weights": (_truncate_weights, "sha256"),
    "truncated weights, sha resealed": (_truncated_resealed, "unreadable safetensors"),
    "partial copy: no manifest": (lambda v: (v / MANIFEST_NAME).unlink(), "no manifest.json"),
    "partial copy: no weights": (lambda v: (v / WEIGHTS_NAME).unlink(), "weights file .* is missing"),
    "partial copy: half a manifest": (_half_written_manifest, "invalid manifest"),
    "wrong sha256": (_wrong_sha, "does not match the manifest"),
    "manifest does not fit the weights": (_five_classes_for_six_outputs, "do not fit architecture"),
}


# -- tests -----------------------------------------------------------------------------------------------


def test_load_initial_serves_the_newest_version_warmed_up(store: ModelStore[Runner], model_dir: Path,
                                                         variant: Callable[..., Path],
                                                         metrics: Metrics) -> None:
    publish(variant("v1"), model_dir)
    newest = publish(variant("v2"), model_dir)

    serving = store.load_initial()

    assert isinstance(serving, ServingModel)
    assert (serving.version, serving.path) == ("v2", newest)
    assert serving.runner.warmed_batch_sizes == BATCH_SIZES
    assert store.current is serving
    assert serving_version(metrics) == "v2" and model_reloads(metrics) == (1, 0)


def test_poll_returns_a_newer_version_once(store: ModelStore[Runner], model_dir: Path,
                                           variant: Callable[..., Path]) -> None:
    publish(variant("v1"), model_dir)
    store.load_initial()
    assert store.poll() is None

    publish(variant("v2"), model_dir)

    assert store.poll().version == "v2"
    assert store.poll() is None
    assert store.current.version == "v2"


def test_quick_publishes_end_on_the_newest(store: ModelStore[Runner], model_dir: Path,
                                           variant: Callable[..., Path]) -> None:
    publish(variant("v1"), model_dir)
    store.load_initial()
    for version in ("v2", "v3", "v4", "v5"):
        publish(variant(version), model_dir)

    assert store.poll().version == "v5"
    assert store.poll() is None


def test_polling_during_a_burst_of_publishes_ends_on_the_newest(store: ModelStore[Runner], model_dir: Path,
                                                                variant: Callable[..., Path]) -> None:
    publish(variant("v1"), model_dir)
    store.load_initial()
    sources = [variant(f"v{i}") for i in range(2, 8)]
    publisher = threading.Thread(target=lambda: [publish(src, model_dir) for src in sources])
    seen: list[str] = []

    with capture_logs() as logs:
        publisher.start()
        while publisher.is_alive():
            if (found := store.poll()) is not None:
                seen.append(found.version)
        publisher.join()
        while (found := store.poll()) is not None:
            seen.append(found.version)

    assert seen[-1] == "v7"
    assert seen == sorted(seen)  # never goes back to an older version
    assert rejections(logs) == []  # the store never sees a half-published version


def test_an_older_version_appearing_later_is_ignored(store: ModelStore[Runner], model_dir: Path,
                                                     variant: Callable[..., Path]) -> None:
    publish(variant("v2"), model_dir)
    store.load_initial()
    shutil.copytree(variant("v1"), model_dir / "20000101T000000.000000Z-v1")

    assert store.poll() is None
    assert store.current.version == "v2"


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_version_is_rejected_and_the_old_model_stays(breakage: str, store: ModelStore[Runner],
                                                              model_dir: Path, variant: Callable[..., Path],
                                                              metrics: Metrics) -> None:
    break_it, reason = BREAKAGES[breakage]
    publish(variant("v1"), model_dir)
    serving = store.load_initial()
    bad = publish(variant("v2"), model_dir)
    break_it(bad)

    with capture_logs() as logs:
        assert store.poll() is None  # pending: it may still be being copied
        assert rejections(logs) == [] and [e["version"] for e in pending(logs)] == [bad.name]
        assert store.poll() is None  # unchanged since: rejected

    assert store.current is serving
    [line] = rejections(logs)
    assert line["log_level"] == "warning"
    assert line["version"] == bad.name and line["serving"] == "v1"
    assert line["kind"] == "invalid_checkpoint"
    assert re.search(reason, line["reason"]), line["reason"]
    assert model_reloads(metrics) == (1, 1)
    assert serving_version(metrics) == "v1"


def test_non_finite_outputs_are_rejected_by_the_warm_up(store: ModelStore[Runner], model_dir: Path,
                                                        variant: Callable[..., Path], nan_checkpoint: Path,
                                                        metrics: Metrics) -> None:
    publish(variant("v1"), model_dir)
    store.load_initial()
    bad = publish(nan_checkpoint, model_dir)  # publish cannot tell: schema, sha and shapes are all fine

    with capture_logs() as logs:
        assert store.poll() is None

    [line] = rejections(logs)
    assert (line["version"], line["kind"]) == (bad.name, "prepare_failed")
    assert "non-finite" in line["reason"]
    assert model_reloads(metrics) == (1, 1)
    assert store.current.version == "v1"


def test_an_unexpected_prepare_error_is_a_rejection_not_a_crash(model_dir: Path, variant: Callable[..., Path],
                                                                metrics: Metrics) -> None:
    def fragile(model: RepNet, manifest: Manifest) -> Runner:
        if manifest.model_version == "v2":
            raise RuntimeError("CUDA out of memory")
        return prepare(model, manifest)

    store = ModelStore(model_dir, fragile, metrics=metrics)
    publish(variant("v1"), model_dir)
    store.load_initial()
    publish(variant("v2"), model_dir)

    with capture_logs() as logs:
        assert store.poll() is None

    [line] = rejections(logs)
    assert line["kind"] == "prepare_error" and "CUDA out of memory" in line["reason"]
    assert store.current.version == "v1"


def test_a_rejected_version_is_not_retried_until_its_files_change(store: ModelStore[Runner], model_dir: Path,
                                                                  variant: Callable[..., Path],
                                                                  metrics: Metrics) -> None:
    publish(variant("v1"), model_dir)
    store.load_initial()
    bad = publish(variant("v2"), model_dir)
    good_manifest = (bad / MANIFEST_NAME).read_bytes()
    _wrong_sha(bad)

    with capture_logs() as logs:
        for _ in range(3):
            assert store.poll() is None
    assert len(rejections(logs)) == 1
    assert model_reloads(metrics)[1] == 1

    # an operator repairs the manifest in place; same size, so move the mtime as a later write would
    (bad / MANIFEST_NAME).write_bytes(good_manifest)
    st = os.stat(bad / MANIFEST_NAME)
    os.utime(bad / MANIFEST_NAME, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    assert store.poll().version == "v2"


def test_a_newest_broken_version_falls_back_to_a_newer_valid_one(store: ModelStore[Runner], model_dir: Path,
                                                                 variant: Callable[..., Path]) -> None:
    publish(variant("v1"), model_dir)
    store.load_initial()
    publish(variant("v2"), model_dir)
    _wrong_sha(publish(variant("v3"), model_dir))

    assert store.poll().version == "v2"


def test_load_initial_skips_broken_versions(store: ModelStore[Runner], model_dir: Path,
                                            variant: Callable[..., Path], metrics: Metrics) -> None:
    publish(variant("v1"), model_dir)
    (publish(variant("v2"), model_dir) / WEIGHTS_NAME).unlink()

    assert store.load_initial().version == "v1"
    assert model_reloads(metrics) == (1, 0)  # v2 is pending, not yet rejected
    assert store.poll() is None
    assert model_reloads(metrics) == (1, 1)


def test_a_class_set_change_is_served_with_a_warning(store: ModelStore[Runner], model_dir: Path,
                                                     variant: Callable[..., Path]) -> None:
    publish(variant("v1"), model_dir)
    store.load_initial()
    renamed = CLASSES[:5] + ("holes",)
    publish(variant("v2", renamed), model_dir)

    with capture_logs() as logs:
        assert store.poll().manifest.class_names == renamed

    [warning] = [e for e in logs if e["event"] == "model_class_set_changed"]
    assert warning["log_level"] == "warning"
    assert (warning["added"], warning["removed"]) == (["holes"], ["scratches"])
    assert (warning["previous_version"], warning["version"]) == ("v1", "v2")


def test_the_same_class_set_logs_no_warning(store: ModelStore[Runner], model_dir: Path,
                                            variant: Callable[..., Path]) -> None:
    publish(variant("v1"), model_dir)
    store.load_initial()
    publish(variant("v2"), model_dir)

    with capture_logs() as logs:
        store.poll()

    assert [e for e in logs if e["log_level"] == "warning"] == []


def test_without_a_model_dir_the_bundled_model_serves(bundled: Path, metrics: Metrics) -> None:
    store = ModelStore(None, prepare, metrics=metrics)

    serving = store.load_initial()

    assert (serving.version, serving.path) == ("bundled", bundled)
    assert store.poll() is None
    assert serving_version(metrics) == "bundled"


def test_an_empty_model_dir_serves_the_bundled_model_until_a_version_arrives(
        bundled: Path, store: ModelStore[Runner], model_dir: Path, variant: Callable[..., Path]) -> None:
    with capture_logs() as logs:
        assert store.load_initial().version == "bundled"
    assert [e["log_level"] for e in logs if e["event"] == "model_fallback_bundled"] == ["warning"]
    assert store.poll() is None

    publish(variant("v1"), model_dir)

    assert store.poll().version == "v1"


def test_a_model_dir_that_does_not_exist_yet_is_watched(bundled: Path, tmp_path: Path,
                                                        variant: Callable[..., Path]) -> None:
    store = ModelStore(tmp_path / "later", prepare, metrics=Metrics())
    assert store.load_initial().version == "bundled"

    publish(variant("v1"), tmp_path / "later")

    assert store.poll().version == "v1"


def test_nothing_valid_anywhere_is_a_clear_error(nothing_bundled: None, store: ModelStore[Runner],
                                                 model_dir: Path, variant: Callable[..., Path]) -> None:
    _wrong_sha(publish(variant("v1"), model_dir))

    with pytest.raises(NoValidModelError, match=r"no valid model to serve .*has no valid version.*bundled"):
        store.load_initial()


def test_no_model_dir_and_nothing_bundled_is_a_clear_error(nothing_bundled: None) -> None:
    with pytest.raises(NoValidModelError, match="no model directory given.*bundled"):
        ModelStore(None, prepare, metrics=Metrics()).load_initial()


def test_poll_before_load_initial_is_a_usage_error(store: ModelStore[Runner]) -> None:
    with pytest.raises(RuntimeError, match="load_initial"):
        store.poll()
