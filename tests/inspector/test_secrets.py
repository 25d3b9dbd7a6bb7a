"""Secrets never appear in any output (issue 13, item 6): not in a settings error, not in stdout, stderr or the
logs of a running `inspector run` (debug level, including aiokafka's own lines and a SASL handshake that
fails), not in /metrics, not in an event or a dead letter."""

from __future__ import annotations

import asyncio
import json
import os
import random

import pytest
from pydantic import SecretStr

from inspector.cli import main
from inspector.settings import KafkaSecurity, Settings, kafka_client_kwargs
from tests.helpers.harness import InspectorProcess, Tail
from tests.helpers.http import http_get
from tests.helpers.models import export_tiny, version_dir_name
from tests.helpers.poison import KINDS
from tests.helpers.streams import produce, service_settings, tiny_frame

SASL_PASSWORD = "SuperSecret-sasl-7f3a9c"
KEY_PASSWORD = "SuperSecret-key-2b8e41"
SECRETS = (SASL_PASSWORD, KEY_PASSWORD)
PREFIXES = tuple(s[:6] for s in SECRETS) + ("7f3a9c", "2b8e41")  # not even a part (the issue saw 'SuperS...')


def leaks(text: str) -> list[str]:
    return [s for s in (*SECRETS, *PREFIXES[2:]) if s in text]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("INSPECTOR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


K = "INSPECTOR_KAFKA__"
BAD_CONFIGURATIONS = {
    "sasl without a mechanism": {f"{K}SECURITY_PROTOCOL": "SASL_PLAINTEXT", f"{K}SASL_PASSWORD": SASL_PASSWORD},
    "sasl without a user": {f"{K}SECURITY_PROTOCOL": "SASL_SSL", f"{K}SASL_MECHANISM": "PLAIN",
                            f"{K}SASL_PASSWORD": SASL_PASSWORD, f"{K}SSL_PASSWORD": KEY_PASSWORD},
    "broken JSON holding the password": {"INSPECTOR_KAFKA": f'{{"sasl_password": "{SASL_PASSWORD}", '},
    "JSON with an unknown key": {"INSPECTOR_KAFKA": json.dumps({"sasl_password": SASL_PASSWORD,
                                                               "pasword": KEY_PASSWORD})},
    "a password that is not text": {"INSPECTOR_KAFKA": json.dumps({"sasl_password": {"v": SASL_PASSWORD}})},
    "an unknown protocol": {"INSPECTOR_KAFKA__SECURITY_PROTOCOL": SASL_PASSWORD,
                            "INSPECTOR_KAFKA__SASL_PASSWORD": SASL_PASSWORD},
    "an invalid value elsewhere": {"INSPECTOR_KAFKA__SASL_PASSWORD": SASL_PASSWORD, "INSPECTOR_MAX_BATCH": "0"},
}


@pytest.mark.parametrize("case", list(BAD_CONFIGURATIONS))
def test_a_settings_error_names_the_field_never_the_value(case, clean_env, capsys):
    for name, value in BAD_CONFIGURATIONS[case].items():
        clean_env.setenv(name, value)
    assert main(["run"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("inspector") and len(err.strip().splitlines()) == 1, err
    assert leaks(out + err) == [] and not any(p in out + err for p in PREFIXES)


def test_a_bad_flag_value_next_to_a_secret_flag(clean_env, capsys):
    assert main(["run", "--kafka.sasl-password", SASL_PASSWORD, "--kafka.security-protocol", "SASL_SSL"]) == 2
    out, err = capsys.readouterr()
    assert "sasl_mechanism" in err and leaks(out + err) == []


def test_the_settings_hide_every_secret():
    kafka = KafkaSecurity(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="line7",
                          sasl_password=SASL_PASSWORD, ssl_password=KEY_PASSWORD)
    settings = Settings(kafka=kafka, device="cpu")
    assert isinstance(settings.kafka.ssl_password, SecretStr) and isinstance(settings.kafka.sasl_password, SecretStr)
    for text in (repr(settings), str(settings), settings.model_dump_json(), json.dumps(settings.model_dump(),
                                                                                      default=str)):
        assert leaks(text) == []
    assert kafka_client_kwargs(settings)["sasl_plain_password"] == SASL_PASSWORD  # only aiokafka gets it


# -- a running inspector --------------------------------------------------------------------------------------

async def serve_and_collect(inspector: InspectorProcess, bootstrap: str, settings: Settings) -> list[str]:
    """Frames and one poison record through the process; every output it made, as text."""
    texts = []
    async with Tail(bootstrap, settings.output_topic) as events, Tail(bootstrap, settings.dead_letter_topic) as dlq:
        await inspector.wait_for_log("partitions_assigned", 90)
        _, make = KINDS["duplicate_header"]
        await produce(bootstrap, settings.topic, [tiny_frame(f"s{i}", camera=i % 2) for i in range(8)]
                      + [make("poison-0", random.Random(0))])
        await events.wait_until(lambda rs: len(rs) >= 8, 60, "8 events", alive=inspector.alive)
        await dlq.wait_until(lambda rs: len(rs) >= 1, 60, "a dead letter", alive=inspector.alive)
        texts += [r.value.decode() for r in events.records + dlq.records]
        texts += [str(r.headers) for r in events.records + dlq.records]
    status, _, body = await asyncio.to_thread(http_get, inspector.metrics_url())
    assert status == 200
    texts.append(body.decode())
    for path in ("/live", "/ready"):
        texts.append((await asyncio.to_thread(http_get, inspector.metrics_url().replace("/metrics", path)))[2].decode())
    return texts


@pytest.mark.kafka
def test_no_configured_secret_reaches_any_output_of_a_running_inspector(kafka_broker, new_topic, tmp_path):
    models = tmp_path / "models"
    export_tiny(models / version_dir_name(1, "v1"), "v1")
    settings = service_settings(kafka_broker, new_topic(partitions=1), models, log_level="debug")
    env = {"INSPECTOR_KAFKA__SASL_USERNAME": "line7", "INSPECTOR_KAFKA__SASL_PASSWORD": SASL_PASSWORD,
           "INSPECTOR_KAFKA__SSL_PASSWORD": KEY_PASSWORD}  # configured, PLAINTEXT: unused but present
    inspector = InspectorProcess(settings, tmp_path / "run", env=env).start()
    try:
        texts = asyncio.run(serve_and_collect(inspector, kafka_broker, settings))
        assert inspector.terminate() == 0
    finally:
        if inspector.alive():
            inspector.kill()
    log = inspector.log_path.read_text()  # stdout and stderr together
    assert "kafka_connected" in log or "partitions_assigned" in log
    assert [leak for text in texts + [log] for leak in leaks(text)] == []


@pytest.mark.kafka
def test_a_failing_sasl_handshake_logs_no_secret(kafka_broker, new_topic, tmp_path):
    models = tmp_path / "models"
    export_tiny(models / version_dir_name(1, "v1"), "v1")
    settings = service_settings(kafka_broker, new_topic(), models, log_level="debug", connect_backoff_max_s=0.5)
    env = {"INSPECTOR_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT", "INSPECTOR_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
           "INSPECTOR_KAFKA__SASL_USERNAME": "line7", "INSPECTOR_KAFKA__SASL_PASSWORD": SASL_PASSWORD}
    inspector = InspectorProcess(settings, tmp_path / "run", env=env).start()
    try:
        asyncio.run(inspector.wait_for_log("kafka_unreachable", 90))
        assert inspector.terminate() == 0
    finally:
        if inspector.alive():
            inspector.kill()
    assert leaks(inspector.log_path.read_text()) == []
