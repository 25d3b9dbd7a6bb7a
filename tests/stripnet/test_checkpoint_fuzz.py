"""Fuzzing the manifest and checkpoint loader (hypothesis): whatever a version directory holds, load_checkpoint
returns a model that fits its manifest or raises CheckpointError — no other exception, and never more memory
than the limits allow (issue 13's bound: 600 MB of peak RSS growth per version).

Three properties: arbitrary JSON values in any manifest field (the weights valid and sealed); arbitrary
architectures, from tiny to absurd (the weights those of another network); arbitrary byte mutations of the
weights file, header included, re-sealed so that the sha256 check does not stop them first.
`FUZZ_EXAMPLES` / 2 examples per property (100 by default).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, BlockSpec, InputSpec
from stripnet.architectures import EG_REPVGG
from stripnet.checkpoint import CheckpointError, export_checkpoint, load_checkpoint, sha256_file
from stripnet.network import build_model
from tests.helpers.harness import peak_rss_bytes, reset_peak_rss

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200")) // 2  # an example writes and reads a checkpoint
BOUND_BYTES = 600 << 20
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A two-block network on 16×16 inputs: a few KB, so one example takes milliseconds."""
    spec = EG_REPVGG.model_copy(update={"blocks": (BlockSpec(out_channels=4, stride=2),) * 2})
    out = tmp_path_factory.mktemp("good") / "v1"
    export_checkpoint(build_model(spec, 2), out, class_names=("a", "b"), model_name="tiny", model_version="v1",
                      input_spec=InputSpec(size=16))
    return out


def load_is_safe(ckpt: Path) -> None:
    """The property every example checks: a fitting model or a CheckpointError, within the memory bound."""
    reset_peak_rss(os.getpid())
    before = peak_rss_bytes(os.getpid())
    try:
        model, manifest = load_checkpoint(ckpt, batch=32)
    except CheckpointError:
        pass
    else:
        assert model.num_classes == len(manifest.class_names)
    assert peak_rss_bytes(os.getpid()) - before < BOUND_BYTES


def with_manifest(good: Path, edit) -> Path:
    ckpt = Path(tempfile.mkdtemp(prefix="fuzz-")) / "v"
    shutil.copytree(good, ckpt)
    doc = json.loads((ckpt / MANIFEST_NAME).read_text())
    edit(doc)
    (ckpt / MANIFEST_NAME).write_text(json.dumps(doc))
    return ckpt


FIELDS = ["format_version", "model_name", "model_version", "architecture", "deploy", "class_names", "input",
          "weights_file", "weights_sha256", "parameters", "macs", "metrics", "created_at", "notes",
          "architecture.in_channels", "architecture.blocks", "architecture.eca_kernel_size", "architecture.attention",
          "input.size", "input.channels", "input.normalization", "input.normalization.std"]


def put(doc: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc[key]
    doc[last] = value


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(FIELDS), json_values), min_size=1, max_size=3))
def test_any_values_in_the_manifest(good, edits):
    def edit(doc):
        for path, value in edits:
            try:
                put(doc, path, value)
            except (TypeError, KeyError):  # an earlier edit replaced a parent with a non-object or emptied it
                pass
    ckpt = with_manifest(good, edit)
    try:
        load_is_safe(ckpt)
    finally:
        shutil.rmtree(ckpt.parent)


blocks = st.lists(st.fixed_dictionaries({"out_channels": st.one_of(st.integers(1, 64), st.integers(1, 10**9)),
                                         "stride": st.sampled_from([1, 2])}), min_size=1, max_size=10)


@FUZZ
@given(blocks=blocks, size=st.one_of(st.integers(1, 256), st.integers(1, 10**6)),
       classes=st.integers(2, 10**5), eca=st.integers(1, 10**7), deploy=st.booleans())
def test_any_architecture(good, blocks, size, classes, eca, deploy):
    def edit(doc):
        doc["architecture"] |= {"blocks": blocks, "eca_kernel_size": eca}
        doc["input"]["size"], doc["deploy"] = size, deploy
        doc["class_names"] = [f"c{i}" for i in range(classes)]
    ckpt = with_manifest(good, edit)
    try:
        load_is_safe(ckpt)
    finally:
        shutil.rmtree(ckpt.parent)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("header_length"), st.integers(0, 2**64 - 1), st.just(0)),
)


def mutate(data: bytes, how: tuple) -> bytes:
    kind, at, arg = how
    if not data:
        return data
    at = at % len(data)
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ arg]) + data[at + 1:]
    if kind == "cut":
        return data[:at]
    if kind == "insert":
        return data[:at] + arg + data[at:]
    return at.to_bytes(8, "little") + data[8:] if kind == "header_length" else data


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=4), header_bias=st.booleans())
def test_any_bytes_in_the_weights_resealed(good, mutations, header_bias):
    ckpt = with_manifest(good, lambda doc: None)
    data = (ckpt / WEIGHTS_NAME).read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for kind, at, arg in mutations:
        data = mutate(data, (kind, at % header if header_bias and kind != "header_length" else at, arg))
    (ckpt / WEIGHTS_NAME).write_bytes(data)
    doc = json.loads((ckpt / MANIFEST_NAME).read_text()) | {"weights_sha256": sha256_file(ckpt / WEIGHTS_NAME)}
    (ckpt / MANIFEST_NAME).write_text(json.dumps(doc))
    try:
        load_is_safe(ckpt)
    finally:
        shutil.rmtree(ckpt.parent)
