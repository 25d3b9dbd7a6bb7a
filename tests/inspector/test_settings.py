import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from inspector.cli import parse
from inspector.settings import KafkaSecurity, Settings, kafka_client_kwargs


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("INSPECTOR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_match_the_agreed_interface():
    s = Settings()
    assert (s.bootstrap_servers, s.topic, s.output_topic, s.dead_letter_topic, s.group_id) == (
        "localhost:9092", "strip.frames", "strip.defects", "strip.frames.dlq", "strip-inspector")
    assert (s.device, s.max_batch, s.max_wait_ms, s.http_port, s.locate) == ("auto", 32, 10.0, 9400, False)


def test_cli_flags_beat_environment_which_beats_dotenv(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("INSPECTOR_TOPIC=from-dotenv\nINSPECTOR_GROUP_ID=dotenv-group\n")
    monkeypatch.setenv("INSPECTOR_TOPIC", "from-env")
    monkeypatch.setenv("INSPECTOR_MAX_BATCH", "8")
    _, s = parse(["run", "--max-batch", "4", "--model-dir", "/models"])
    assert (s.topic, s.group_id, s.max_batch, s.model_dir) == ("from-env", "dotenv-group", 4, Path("/models"))


def test_nested_kafka_security_from_environment(monkeypatch):
    monkeypatch.setenv("INSPECTOR_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("INSPECTOR_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("INSPECTOR_KAFKA__SASL_USERNAME", "line7")
    monkeypatch.setenv("INSPECTOR_KAFKA__SASL_PASSWORD", "s3cret")
    s = Settings()
    assert "s3cret" not in repr(s)
    kwargs = kafka_client_kwargs(s)
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT" and kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("line7", "s3cret")


def test_ssl_gives_an_ssl_context():
    kwargs = kafka_client_kwargs(Settings(kafka=KafkaSecurity(security_protocol="SSL")))
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize("bad", [
    {"kafka": {"security_protocol": "SASL_SSL"}},  # no credentials
    {"device": "tpu"},
    {"max_batch": 0},
    {"heartbeat_interval_ms": 5000, "session_timeout_ms": 6000},
])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValidationError):
        Settings(**bad)


SERVED_BATCHES = """
import resource, sys
import numpy as np
from inspector.app import build
from inspector.settings import Settings
from stripnet.bundled import default_model_dir
from stripnet.checkpoint import load_checkpoint
overrides = {} if sys.argv[1] == "defaults" else {"keep_freed_memory": False}
settings = Settings(model_dir=default_model_dir(), device="cpu", backend="torch", **overrides)
runner = build(settings).loader.load(*load_checkpoint(settings.model_dir))
frames = [np.full((200, 200), 128, np.uint8)] * 32
runner.predict(frames)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    runner.predict(frames)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_by_default_the_service_reuses_its_batches_memory_instead_of_faulting_it_in_again():
    """An eager torch runner allocates its activation maps afresh every batch; with glibc's own thresholds each
    batch takes fresh, zeroed pages (stripnet/allocator.py)."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", SERVED_BATCHES, mode], capture_output=True,
                                       text=True, check=True).stdout)
              for mode in ("defaults", "glibc")}
    assert faults["defaults"] * 4 < faults["glibc"], faults
