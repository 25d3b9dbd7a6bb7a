"""The model store: finds the newest valid model version, validates and prepares it, remembers rejects.

A model directory holds one sub-directory per version (trainer/publish.py); names starting with
"." are in-flight copies and ignored, and the newest version is the greatest name. A candidate is
served only after `load_checkpoint` (manifest schema, sha256, architecture vs weights) and the
runner loader's `load` (inspector/runners.py: device, warm-up, finite outputs) both succeed. A rejected
version is remembered by its directory name and its files' sizes, mtimes and inodes, and is retried
only when those change. Everything here blocks: the service calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import structlog

from inspector.metrics import Metrics
from schemas.checkpoint import Manifest
from stripnet.bundled import resolve_model_dir
from stripnet.checkpoint import CheckpointError, load_checkpoint
from stripnet.network import RepNet

T = TypeVar("T")
Fingerprint = tuple[tuple[str, int, int, int], ...]


class NoValidModelError(FileNotFoundError):
    """Neither the model directory nor the package holds a model that passes validation."""


@dataclass(frozen=True)
class ServingModel(Generic[T]):
    runner: T
    manifest: Manifest
    path: Path

    @property
    def version(self) -> str:
        return self.manifest.model_version


class ModelStore(Generic[T]):
    def __init__(self, model_dir: Path | None, prepare: Callable[[RepNet, Manifest], T], *,
                 metrics: Metrics) -> None:
        self._model_dir = Path(model_dir) if model_dir is not None else None
        self._prepare = prepare
        self._metrics = metrics
        self._current: ServingModel[T] | None = None
        self._rejected: dict[str, Fingerprint] = {}
        self._lock = threading.Lock()
        self._log = structlog.get_logger(__name__)

    @property
    def current(self) -> ServingModel[T] | None:
        return self._current

    def load_initial(self) -> ServingModel[T]:
        """The newest valid version in the model directory, else the bundled model, else NoValidModelError."""
        with self._lock:
            found = self._newest_valid(self._versions())
            if found is None:
                found = self._bundled()
            self._activate(found)
            return found

    def poll(self) -> ServingModel[T] | None:
        """A valid version newer than the current one, prepared and now current; None if there is none."""
        with self._lock:
            if self._current is None:
                raise RuntimeError("call load_initial() before poll()")
            found = self._newest_valid([p for p in self._versions() if self._is_newer(p)])
            if found is not None:
                self._activate(found)
            return found

    # -- candidates ---------------------------------------------------------------------------------

    def _versions(self) -> list[Path]:
        """Version directories, newest first; forgets rejects whose directory is gone."""
        if self._model_dir is None:
            return []
        try:
            entries = [p for p in self._model_dir.iterdir() if not p.name.startswith(".") and p.is_dir()]
        except FileNotFoundError:
            return []  # the trainer may create it later
        except OSError as err:
            self._log.warning("model_dir_unreadable", path=str(self._model_dir), reason=str(err))
            return []
        names = {p.name for p in entries}
        self._rejected = {k: v for k, v in self._rejected.items() if k in names}
        return sorted(entries, key=lambda p: p.name, reverse=True)

    def _is_newer(self, path: Path) -> bool:
        current = self._current
        if current is None or current.path.parent != self._model_dir:
            return True  # the bundled model yields to any valid version in the model directory
        return path.name > current.path.name

    def _newest_valid(self, candidates: list[Path]) -> ServingModel[T] | None:
        for path in candidates:
            fingerprint = _fingerprint(path)
            if fingerprint is None or self._rejected.get(path.name) == fingerprint:
                continue
            found = self._try(path)
            if found is not None:
                return found
            self._rejected[path.name] = fingerprint
        return None

    def _bundled(self) -> ServingModel[T]:
        where = (f"model directory {self._model_dir} has no valid version" if self._model_dir is not None
                 else "no model directory given")
        try:
            path = resolve_model_dir("default")
        except FileNotFoundError as err:
            raise NoValidModelError(f"no valid model to serve ({where}): {err}") from None
        found = self._try(path)
        if found is None:
            raise NoValidModelError(f"no valid model to serve ({where}); the bundled model at {path} was rejected")
        level = self._log.warning if self._model_dir is not None else self._log.info
        level("model_fallback_bundled", path=str(path), reason=where)
        return found

    # -- validation ---------------------------------------------------------------------------------

    def _try(self, path: Path) -> ServingModel[T] | None:
        """Load, validate and prepare one version; on failure log one line, count it and return None."""
        try:
            model, manifest = load_checkpoint(path)
        except (CheckpointError, OSError) as err:
            return self._reject(path, str(err), "invalid_checkpoint")
        try:
            runner = self._prepare(model, manifest)
        except ValueError as err:
            return self._reject(path, str(err), "prepare_failed")
        except Exception as err:  # a bad candidate must never stop the model that is serving
            return self._reject(path, f"{type(err).__name__}: {err}", "prepare_error", exc_info=err)
        return ServingModel(runner=runner, manifest=manifest, path=path)

    def _reject(self, path: Path, reason: str, kind: str, exc_info: BaseException | None = None) -> None:
        """One log line with the full reason (and its bounded `kind`); one failed reload counted."""
        serving = self._current.version if self._current is not None else None
        extra = {"exc_info": exc_info} if exc_info is not None else {}
        self._log.warning("model_rejected", version=path.name, path=str(path), reason=reason, kind=kind,
                          serving=serving, **extra)
        self._metrics.model_reload(False)

    def _activate(self, found: ServingModel[T]) -> None:
        previous = self._current
        if previous is not None:
            old, new = set(previous.manifest.class_names), set(found.manifest.class_names)
            if old != new:
                self._log.warning("model_class_set_changed", version=found.version,
                                  previous_version=previous.version, added=sorted(new - old),
                                  removed=sorted(old - new))
        self._current = found
        self._log.info("model_active", version=found.version, model_name=found.manifest.model_name,
                       path=str(found.path), classes=list(found.manifest.class_names),
                       previous_version=previous.version if previous is not None else None)
        self._metrics.model_reload(True)
        self._metrics.model_active(found.manifest)


def _fingerprint(path: Path) -> Fingerprint | None:
    """Names, sizes, mtimes and inodes of a version's files; None if it vanished mid-scan."""
    try:
        with os.scandir(path) as entries:
            stats = [(e.name, e.stat()) for e in entries]
    except OSError:
        return None
    return tuple(sorted((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats))
