import json

import pytest
import torch

from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import CheckpointError, export_checkpoint, load_checkpoint
from stripnet.network import build_model

from tests.helpers.models import randomize_bn

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


@pytest.fixture
def trained(tmp_path):
    model = randomize_bn(build_model(EG_REPVGG, 6)).eval()
    manifest = export_checkpoint(model, tmp_path / "ckpt", class_names=CLASSES, model_name="eg", model_version="v1")
    return model, manifest, tmp_path / "ckpt"


def test_round_trip_gives_the_same_outputs(trained, tmp_path):
    model, manifest, ckpt = trained
    assert sorted(p.name for p in ckpt.iterdir()) == [MANIFEST_NAME, WEIGHTS_NAME]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    loaded, read = load_checkpoint(ckpt)
    assert read == manifest and read.class_names == CLASSES and loaded.is_deploy
    assert read.parameters == 140_831 and read.architecture == EG_REPVGG
    x = torch.randn(2, 3, 200, 200)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)


def test_export_refuses_to_overwrite(trained):
    model, _, ckpt = trained
    with pytest.raises(FileExistsError):
        export_checkpoint(model, ckpt, class_names=CLASSES, model_name="eg")


def test_tampered_weights_are_rejected(trained):
    _, _, ckpt = trained
    data = bytearray((ckpt / WEIGHTS_NAME).read_bytes())
    data[-10] ^= 0xFF
    (ckpt / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(ckpt)


def test_truncated_weights_with_matching_sha_are_rejected(trained):
    _, _, ckpt = trained
    (ckpt / WEIGHTS_NAME).write_bytes((ckpt / WEIGHTS_NAME).read_bytes()[:1000])
    doc = json.loads((ckpt / MANIFEST_NAME).read_text())
    import hashlib
    doc["weights_sha256"] = hashlib.sha256((ckpt / WEIGHTS_NAME).read_bytes()).hexdigest()
    (ckpt / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(ckpt)


def test_manifest_that_does_not_fit_the_weights(trained):
    _, _, ckpt = trained
    doc = json.loads((ckpt / MANIFEST_NAME).read_text())
    doc["class_names"] = ["a", "b", "c"]
    (ckpt / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format_version": 1})])
def test_corrupt_manifest_is_a_clear_error(trained, content):
    _, _, ckpt = trained
    (ckpt / MANIFEST_NAME).write_text(content)
    with pytest.raises(CheckpointError, match="invalid manifest"):
        load_checkpoint(ckpt)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


def test_weights_are_not_a_pickle(trained):
    _, _, ckpt = trained
    head = (ckpt / WEIGHTS_NAME).read_bytes()[:16]
    assert not head.startswith(b"PK") and not head.startswith(b"\x80")  # neither torch zip nor raw pickle
