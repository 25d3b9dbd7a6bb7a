"""Security: checkpoints are never unpickled, frame size and pixel limits hold at their edges, and the Kafka
SSL/SASL settings reach every aiokafka client the service builds (unit tests, no broker)."""

from __future__ import annotations

import ast
import asyncio
import json
import pickle
import shutil
import ssl
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inspector import connect
from inspector.decode import Decoded, DecodeLimits, Rejected, decode_frame
from inspector.metrics import Metrics
from inspector.model_store import ModelStore
from inspector.settings import KafkaSecurity, Settings
from schemas.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
from schemas.messages import FrameHeaders
from stripnet.checkpoint import CheckpointError, load_checkpoint, sha256_file
from tests.helpers import REPO_ROOT
from tests.helpers.models import export_tiny
from trainer.state import load_state


class Trap:
    """Unpickling this calls Path.touch on the marker: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("ckpt") / "good", "v1")


def trapped_checkpoint(good: Path, dst: Path, marker: Path) -> Path:
    """A checkpoint whose weights file is a torch pickle carrying the trap, its sha256 sealed in the manifest."""
    shutil.copytree(good, dst)
    torch.save({"weights": torch.zeros(3), "payload": Trap(marker)}, dst / WEIGHTS_NAME)
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    manifest["weights_sha256"] = sha256_file(dst / WEIGHTS_NAME)
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))
    return dst


def test_the_trap_works_when_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Trap(marker)))
    assert marker.exists()


def test_a_pickled_checkpoint_is_refused_without_running_it(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    evil = trapped_checkpoint(checkpoint, tmp_path / "evil", marker)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(evil)
    models = tmp_path / "models"
    shutil.copytree(checkpoint, models / "20250101T000000.000000Z-v1")
    shutil.copytree(evil, models / "20250102T000000.000000Z-evil")
    store = ModelStore(models, lambda model, manifest: model, metrics=Metrics())
    assert store.load_initial().version == "v1"  # the newer, pickled version was rejected
    assert not marker.exists()


def test_training_state_loads_tensors_only(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"epoch": 3, "payload": Trap(marker)}, tmp_path / "last.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_state(tmp_path / "last.pt")
    assert not marker.exists()
    torch.save({"epoch": 3, "weights": torch.ones(2)}, tmp_path / "ok.pt")
    assert load_state(tmp_path / "ok.pt")["epoch"] == 3


UNSAFE = {("pickle", "load"), ("pickle", "loads"), ("dill", "load"), ("joblib", "load"), ("cloudpickle", "load")}


def unsafe_calls(path: Path) -> list[str]:
    """torch.load without weights_only=True, numpy.load with allow_pickle=True, and pickle-family loads."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            continue
        owner, name = node.func.value.id, node.func.attr
        keywords = {k.arg: k.value for k in node.keywords}
        flag = lambda key: isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True  # noqa: E731
        if ((owner, name) == ("torch", "load") and not flag("weights_only")) or (owner, name) in UNSAFE \
                or (owner in ("np", "numpy") and name == "load" and flag("allow_pickle")):
            found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {owner}.{name}")
    return found


def test_no_code_that_serves_or_trains_unpickles():
    files = [p for package in ("inspector", "stripnet", "trainer", "schemas") for p in (REPO_ROOT / package).rglob("*.py")]
    assert files
    assert [call for path in files for call in unsafe_calls(path)] == []


# -- frame size and pixel limits -------------------------------------------------------------------------

def frame_headers(encoding: str, **extra) -> list[tuple[str, bytes]]:
    return FrameHeaders(camera_id="cam", frame_id="f", captured_at=datetime.now(UTC), encoding=encoding,
                        **extra).to_kafka()


@pytest.mark.parametrize("encoding", ["png", "jpeg", "bmp", "raw"])
def test_the_pixel_limit_holds_at_its_edge_in_every_encoding(encoding):
    image = np.full((48, 50), 128, dtype=np.uint8)  # 2,400 pixels
    if encoding == "raw":
        headers, value = frame_headers("raw", width=50, height=48), image.tobytes()
    else:
        headers, value = frame_headers(encoding), cv2.imencode({"png": ".png", "jpeg": ".jpg", "bmp": ".bmp"}[encoding],
                                                               image)[1].tobytes()
    assert isinstance(decode_frame(headers, value, DecodeLimits(1 << 20, 2400)), Decoded)
    result = decode_frame(headers, value, DecodeLimits(1 << 20, 2399))
    assert isinstance(result, Rejected) and result.reason == "too_many_pixels"


def test_the_byte_limit_holds_at_its_edge():
    image = np.zeros((40, 40), dtype=np.uint8)
    headers, value = frame_headers("raw", width=40, height=40), image.tobytes()
    assert isinstance(decode_frame(headers, value, DecodeLimits(len(value), 1 << 20)), Decoded)
    result = decode_frame(headers, value, DecodeLimits(len(value) - 1, 1 << 20))
    assert isinstance(result, Rejected) and result.reason == "too_large"


# -- Kafka security reaches aiokafka ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a throw-away certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=inspector-test"],
                   check=True, capture_output=True)
    return {"ssl_cafile": d / "cert.pem", "ssl_certfile": d / "cert.pem", "ssl_keyfile": d / "key.pem"}


def secure_settings(tls_files, protocol: str = "SASL_SSL") -> Settings:
    return Settings(bootstrap_servers="kafka-1:9093,kafka-2:9093", device="cpu", max_frame_bytes=8 << 20,
                    kafka=KafkaSecurity(security_protocol=protocol, sasl_mechanism="SCRAM-SHA-512",
                                        sasl_username="line7", sasl_password="s3cret", **tls_files))


class Recorder:
    """Stands in for an aiokafka client class: remembers the keyword arguments it was built with."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return object()


def test_the_service_gives_its_consumer_and_producer_the_security_settings(tls_files, monkeypatch):
    consumer, producer = Recorder(), Recorder()
    monkeypatch.setattr(connect, "AIOKafkaConsumer", consumer)
    monkeypatch.setattr(connect, "AIOKafkaProducer", producer)
    settings = secure_settings(tls_files)
    connect.new_consumer(settings)
    connect.new_producer(settings)
    for kwargs in (consumer.calls[0], producer.calls[0]):
        assert kwargs["bootstrap_servers"] == "kafka-1:9093,kafka-2:9093"
        assert (kwargs["security_protocol"], kwargs["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-512")
        assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("line7", "s3cret")
        context = kwargs["ssl_context"]
        assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname and context.get_ca_certs()
    # a frame at the size limit fits in one fetch; offsets are committed by the service, never automatically
    assert consumer.calls[0]["max_partition_fetch_bytes"] >= settings.max_frame_bytes
    assert consumer.calls[0]["fetch_max_bytes"] >= settings.max_frame_bytes
    assert consumer.calls[0]["enable_auto_commit"] is False
    assert producer.calls[0]["acks"] == "all"
    assert "s3cret" not in repr(settings)


def test_real_aiokafka_clients_carry_the_security_settings(tls_files):
    settings = secure_settings(tls_files)

    async def build():  # aiokafka clients need a running loop; they are built and closed, never started
        consumer, producer = connect.new_consumer(settings), connect.new_producer(settings)
        inner = [consumer._client, producer.client]
        await consumer.stop()
        await producer.stop()
        return inner

    for inner in asyncio.run(build()):
        assert (inner._security_protocol, inner._sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
        assert (inner._sasl_plain_username, inner._sasl_plain_password) == ("line7", "s3cret")
        assert isinstance(inner._ssl_context, ssl.SSLContext)


def test_ssl_and_sasl_come_from_the_environment(tls_files, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name, value in {"SECURITY_PROTOCOL": "SSL", "SSL_CAFILE": tls_files["ssl_cafile"]}.items():
        monkeypatch.setenv(f"INSPECTOR_KAFKA__{name}", str(value))
    consumer = Recorder()
    monkeypatch.setattr(connect, "AIOKafkaConsumer", consumer)
    connect.new_consumer(Settings(device="cpu"))
    kwargs = consumer.calls[0]
    assert kwargs["security_protocol"] == "SSL" and kwargs["ssl_context"].get_ca_certs()
    assert "sasl_mechanism" not in kwargs
