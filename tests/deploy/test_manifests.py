"""deploy/ agrees with the code: real CLI commands, real settings names, one port, the right probes.

Every YAML file is parsed; commands are parsed by the real command lines (`inspector.cli.parse`, the
trainer's argparse parser); every INSPECTOR_* name written anywhere under deploy/ must resolve to a
field of inspector.settings.Settings.
"""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from inspector.cli import parse
from inspector.console.settings import ConsoleSettings
from inspector.settings import Settings
from tests.helpers.deploy import (
    DEPLOY, K8S, compose, compose_env, dockerfile_env, dockerfile_instructions, flag, k8s_docs, k8s_one,
    load_yaml_docs, partitions_in, pod_containers, topics_in, yaml_files,
)
from trainer.cli import build_parser as trainer_parser

PORT = 9400
PROGRAMS = ("inspector", "trainer")
ENV_NAME = re.compile(r"\bINSPECTOR_[A-Z0-9_]*[A-Z0-9]")
CONSOLE_PREFIX = ConsoleSettings.model_config["env_prefix"]


def accepted(argv: list[str]) -> bool:
    """Whether the real command line of argv[0] takes argv[1:] (argparse prints why when it does not)."""
    try:
        if argv[0] == "inspector":
            parse(argv[1:])
        else:
            trainer_parser().parse_args(argv[1:])
    except (SystemExit, ValidationError):
        return False
    return True


def nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(nested_model, typing.get_args(annotation)) if m is not None]
        return models[0] if models else None
    return None


def resolve_env_name(settings: type[BaseModel], name: str, prefix: str = "INSPECTOR_") -> bool:
    model: type[BaseModel] | None = settings
    for part in name.removeprefix(prefix).lower().split("__"):
        if model is None or part not in model.model_fields:
            return False
        model = nested_model(model.model_fields[part].annotation)
    return True


# -- every command the deployment runs ----------------------------------------------------------------


def deployed_commands() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    for name, service in compose()["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command and command[0] in PROGRAMS:
            found.append((f"compose:{name}", [str(c) for c in command]))
    for doc in k8s_docs():
        if doc["kind"] in ("Deployment", "Job"):
            for c in pod_containers(doc):
                argv = [str(a) for a in c.get("command", []) + c.get("args", [])]
                if argv and argv[0] in PROGRAMS:
                    found.append((f"k8s:{doc['kind']}/{c['name']}", argv))
    for keyword, rest in dockerfile_instructions():
        if keyword == "CMD":
            found.append(("Dockerfile:CMD", yaml.safe_load(rest)))
    return found


COMMANDS = deployed_commands()


def test_every_yaml_file_parses_and_k8s_objects_are_well_formed() -> None:
    files = yaml_files()
    assert DEPLOY / "docker-compose.yml" in files and len(files) >= 6
    for path in files:
        assert load_yaml_docs(path), f"{path} is empty"
    for doc in k8s_docs():
        assert {"apiVersion", "kind"} <= doc.keys(), doc
        if doc["kind"] != "Kustomization":
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), doc
    kustomization = k8s_one("Kustomization")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), f"kustomization lists missing {resource}"


def test_the_deployment_runs_the_expected_commands() -> None:
    seen = {(argv[0], argv[1]) for _, argv in COMMANDS}
    assert {("inspector", "run"), ("inspector", "replay"), ("trainer", "publish")} <= seen, seen


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_commands_are_accepted_by_the_real_cli(where: str, argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    assert accepted(argv), f"{where}: `{' '.join(argv)}` is rejected by {argv[0]}'s command line (message above)"


def test_the_inspector_cli_takes_the_port_flag_and_refuses_what_it_does_not_know() -> None:
    assert parse(["run", "--http-port", str(PORT)])[1].http_port == PORT
    assert not accepted(["inspector", "run", "--http-prot", str(PORT)])
    assert not accepted(["inspector", "run", "--http-port", "65536"])


def test_every_inspector_env_name_is_a_settings_field() -> None:
    names: dict[str, set[str]] = {}
    for path in [p for p in DEPLOY.rglob("*") if p.is_file()]:
        for name in ENV_NAME.findall(path.read_text()):
            names.setdefault(name, set()).add(path.relative_to(DEPLOY).as_posix())
    expected = {"INSPECTOR_BOOTSTRAP_SERVERS", "INSPECTOR_GROUP_ID", "INSPECTOR_MODEL_DIR", "INSPECTOR_HTTP_PORT",
                "INSPECTOR_KAFKA__SECURITY_PROTOCOL", "INSPECTOR_KAFKA__SASL_PASSWORD"}
    assert expected <= names.keys()
    unknown = {n: sorted(where) for n, where in names.items() if not known_env_name(n)}
    assert not unknown, f"INSPECTOR_* names that are not Settings (or ConsoleSettings) fields: {unknown}"


def known_env_name(name: str) -> bool:
    """A field of the service's settings, or of the console's (INSPECTOR_CONSOLE_…, or that prefix itself)."""
    if name.startswith(CONSOLE_PREFIX.rstrip("_")):
        return name == CONSOLE_PREFIX.rstrip("_") or resolve_env_name(ConsoleSettings, name, CONSOLE_PREFIX)
    return resolve_env_name(Settings, name)


@pytest.mark.parametrize("where", ["k8s ConfigMap", "compose inspector", "Dockerfile ENV"])
def test_deployed_env_values_build_valid_settings(where: str, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    settings = Settings
    env = {"k8s ConfigMap": lambda: k8s_one("ConfigMap")["data"],
           "compose inspector": lambda: compose_env(compose()["services"]["inspector"]),
           "Dockerfile ENV": dockerfile_env}[where]()
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in [n for n in os.environ if n.startswith("INSPECTOR_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("INSPECTOR_"):
            monkeypatch.setenv(name, str(value))
    built = settings()
    assert built.http_port == PORT
    assert str(built.model_dir) == "/models"

def test_settings_default_port_is_the_deployed_port() -> None:
    assert Settings.model_fields["http_port"].default == PORT


# -- ports and probes ---------------------------------------------------------------------------------


def test_dockerfile_cpu_default_cuda_arg_non_root_port_and_healthcheck() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert ("FROM", "${BASE_IMAGE}") in instructions
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ("EXPOSE", str(PORT)) in instructions
    assert dockerfile_env()["INSPECTOR_HTTP_PORT"] == str(PORT)
    healthcheck = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and f"${{INSPECTOR_HTTP_PORT:-{PORT}}}/live" in healthcheck[0]
    assert yaml.safe_load([rest for kw, rest in instructions if kw == "CMD"][-1]) == ["inspector", "run"]


def test_compose_ports_and_model_volume_agree() -> None:
    services = compose()["services"]
    inspector = services["inspector"]
    env = compose_env(inspector)
    assert env["INSPECTOR_HTTP_PORT"] == str(PORT)
    assert all(str(p).rsplit(":", 1)[-1] == str(PORT) for p in inspector["ports"])
    model_dir = env["INSPECTOR_MODEL_DIR"]
    assert f"models:{model_dir}:ro" in inspector["volumes"]
    publish = services["trainer-publish"]["command"]
    assert f"models:{flag(publish, '--model-dir')}" in services["trainer-publish"]["volumes"]
    assert "models" in compose()["volumes"]


def test_compose_runs_kafka_in_kraft_mode_and_creates_the_topics() -> None:
    services = compose()["services"]
    kafka_env = compose_env(services["kafka"])
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"].split(",")
    assert not any("zookeeper" in name for name in services)
    env = compose_env(services["inspector"])
    script = services["topics-init"]["command"][-1]
    assert topics_in(script) == {env["INSPECTOR_TOPIC"], env["INSPECTOR_OUTPUT_TOPIC"],
                                 env["INSPECTOR_DEAD_LETTER_TOPIC"]}
    camera = services["camera"]["command"]
    assert flag(camera, "--topic") == env["INSPECTOR_TOPIC"]
    assert flag(camera, "--bootstrap-servers") == env["INSPECTOR_BOOTSTRAP_SERVERS"]


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    return named[port]


def test_k8s_ports_and_probes() -> None:
    config = k8s_one("ConfigMap")["data"]
    assert config["INSPECTOR_HTTP_PORT"] == str(PORT)
    deployment = k8s_one("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] == "/live" and container_port(container, live["port"]) == PORT
    assert ready["path"] == "/ready" and container_port(container, ready["port"]) == PORT
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(PORT)
    service = k8s_one("Service")
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["port"] == PORT and container_port(container, svc_port["targetPort"]) == PORT
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {"configMapRef": {"name": k8s_one("ConfigMap")["metadata"]["name"]}} in container["envFrom"]


def test_k8s_model_volume_is_shared_by_the_inspector_and_the_publish_job() -> None:
    claim = k8s_one("PersistentVolumeClaim")["metadata"]["name"]
    model_dir = k8s_one("ConfigMap")["data"]["INSPECTOR_MODEL_DIR"]

    def mount_of(doc: dict[str, Any], container: dict[str, Any]) -> str:
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        (path,) = [m["mountPath"] for m in container["volumeMounts"]
                   if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == claim]
        return path

    deployment = k8s_one("Deployment")
    assert mount_of(deployment, deployment["spec"]["template"]["spec"]["containers"][0]) == model_dir
    jobs = [d for d in k8s_docs() if d["kind"] == "Job"]
    publishers = [(j, c) for j in jobs for c in pod_containers(j) if c.get("command") == ["trainer"]]
    assert publishers, "no Job runs trainer publish"
    for job, container in publishers:
        assert mount_of(job, container) == flag(container["args"], "--model-dir")


def test_keda_scales_the_deployment_on_its_group_and_never_beyond_the_partitions() -> None:
    config = k8s_one("ConfigMap")["data"]
    deployment = k8s_one("Deployment")
    scaled = k8s_one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == config["INSPECTOR_GROUP_ID"]
    assert meta["topic"] == config["INSPECTOR_TOPIC"]
    assert meta["bootstrapServers"] == config["INSPECTOR_BOOTSTRAP_SERVERS"]
    assert str(meta.get("allowIdleConsumers", "false")).lower() == "false"
    topics_job = k8s_one("Job", "strip-inspector-topics")
    script = topics_job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    partitions = partitions_in(script)
    assert topics_in(script) == {config["INSPECTOR_TOPIC"], config["INSPECTOR_OUTPUT_TOPIC"],
                                 config["INSPECTOR_DEAD_LETTER_TOPIC"]}
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= partitions
    assert deployment["spec"]["replicas"] <= scaled["spec"]["maxReplicaCount"]
    compose_partitions = partitions_in(compose()["services"]["topics-init"]["command"][-1])
    assert compose_partitions == partitions


def test_readme_covers_scaling_delivery_upgrades_and_security() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in ("partitions", "at-least-once", "event_id", "trainer publish", "INSPECTOR_KAFKA__SECURITY_PROTOCOL",
                   "INSPECTOR_KAFKA__SASL_PASSWORD", "/live", "/ready", "/metrics"):
        assert needle in text, f"deploy/README.md does not mention {needle}"


def test_env_name_resolution_walks_nested_settings() -> None:
    class Security(BaseModel):
        sasl_username: str | None = None

    class Fake(BaseModel):
        http_port: int = PORT
        kafka: Security = Security()
        maybe: Security | None = None

    assert resolve_env_name(Fake, "INSPECTOR_HTTP_PORT")
    assert resolve_env_name(Fake, "INSPECTOR_KAFKA__SASL_USERNAME")
    assert resolve_env_name(Fake, "INSPECTOR_MAYBE__SASL_USERNAME")
    assert not resolve_env_name(Fake, "INSPECTOR_HTTP_PORTS")
    assert not resolve_env_name(Fake, "INSPECTOR_KAFKA_SASL_USERNAME")  # single underscore: not nested
    assert not resolve_env_name(Fake, "INSPECTOR_HTTP_PORT__X")
