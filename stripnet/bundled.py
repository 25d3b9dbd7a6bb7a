"""The model bundled with the package (stripnet/default_model), and resolving a user's `--model`."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from schemas.checkpoint import MANIFEST_NAME


def default_model_dir() -> Path:
    return Path(str(files("stripnet") / "default_model"))


def resolve_model_dir(model: str | Path) -> Path:
    if str(model) == "default":
        path = default_model_dir()
        if not (path / MANIFEST_NAME).is_file():
            raise FileNotFoundError(f"no model is bundled with this package yet (looked in {path})")
        return path
    return Path(model)
