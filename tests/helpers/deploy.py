"""The files under deploy/, parsed: compose, Kubernetes objects, the Dockerfile's instructions."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from inspector.metrics import Metrics
from tests.helpers import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
METRIC = re.compile(r"\binspector_[a-z0-9_]+")
SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
                   "histogram": ("_bucket", "_sum", "_count", "_created"),
                   "summary": ("", "_sum", "_count", "_created")}


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))


def compose() -> dict[str, Any]:
    return load_yaml_docs(DEPLOY / "docker-compose.yml")[0]


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_yaml_docs(path)]


def k8s_one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind and (name is None or d["metadata"].get("name") == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in dockerfile().splitlines() if not ln.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            env |= dict(item.split("=", 1) for item in shlex.split(rest))
    return env


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def partitions_in(script: str) -> int:
    counts = {int(n) for n in re.findall(r"--partitions\s+(\d+)", script)}
    assert len(counts) == 1, f"expected one --partitions value in {script!r}"
    return counts.pop()


def topics_in(script: str) -> set[str]:
    match = re.search(r"for topic in ([^;]+);", script)
    assert match, f"no topic loop in {script!r}"
    return set(match.group(1).split())


def exported_names() -> set[str]:
    """Every sample name `/metrics` can show, from the registry's families (labelled ones too, before any
    sample exists)."""
    return {family.name + suffix for family in Metrics().registry.collect()
            for suffix in SAMPLE_SUFFIXES[family.type]}


def exported_families() -> dict[str, str]:
    """Each metric family the service exports, by the name an operator queries (counters with `_total`, infos
    with `_info`), and its type."""
    shown = {"counter": "_total", "info": "_info"}
    return {family.name + shown.get(family.type, ""): family.type for family in Metrics().registry.collect()}
