"""The model store: finds the newest valid model version, validates and prepares it, remembers rejects.

A model directory holds one sub-directory per version (trainer/publish.py); names starting with
"." are in-flight copies and ignored, and the newest version is the greatest name. A candidate is
served only after `load_checkpoint` (manifest schema, sha256, architecture vs weights) and the
runner loader's `load` (inspector/runners.py: device, warm-up, finite outputs) both succeed.

The directory is untrusted input (anyone who can write to it can put anything there): a version
directory must be a real directory (not a symbolic link); `load_checkpoint` reads regular files inside
it only, size-capped, and bounds the architecture's cost before building it (`CheckpointLimits`); the
read runs on a daemon thread and is given `read_timeout_s`, so a read that hangs is a rejection, not a
stuck store; every failure, whatever its exception, is a rejection that keeps the serving model.

A version that fails to read while its files still change (a slow, non-atomic copy) is *pending*: it is
logged once and retried. Once its files were seen unchanged by two successive looks, a failure is a
*rejection*: one warning line, one failed reload counted, and the version is remembered by its directory
name and its files' sizes, mtimes and inodes (its fingerprint), and retried only when those change. With
`rejects_file`, rejections are remembered across restarts too, so a restarted process skips them at
start-up and serves the newest valid version. Everything here blocks: the service calls it on a daemon
thread (inspector/detach.py).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import structlog

from inspector.detach import start_daemon
from inspector.metrics import Metrics
from schemas.checkpoint import Manifest
from stripnet.budget import CheckpointLimits
from stripnet.bundled import resolve_model_dir
from stripnet.checkpoint import CheckpointError, load_checkpoint, read_regular
from stripnet.network import RepNet

T = TypeVar("T")
Fingerprint = tuple[tuple[str, int, int, int], ...]
MAX_REJECTS_FILE_BYTES = 4 << 20


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


@dataclass(frozen=True)
class ReadPolicy:
    """How a version is read: the limits it must keep, the batch size they are checked for, the time it gets."""

    limits: CheckpointLimits = CheckpointLimits()
    batch: int = 1  # frames per inference (max_batch): the activation limit is for a batch this size
    timeout_s: float = 30.0


class ModelStore(Generic[T]):
    def __init__(self, model_dir: Path | None, prepare: Callable[[RepNet, Manifest], T], *,
                 metrics: Metrics, reading: ReadPolicy = ReadPolicy(), rejects_file: Path | None = None) -> None:
        self._model_dir = Path(model_dir) if model_dir is not None else None
        if self._model_dir is not None and self._model_dir.exists() and not self._model_dir.is_dir():
            raise NotADirectoryError(f"model directory {self._model_dir} is not a directory")
        self._prepare = prepare
        self._metrics = metrics
        self._reading = reading
        self._current: ServingModel[T] | None = None
        self._rejects = Rejects(rejects_file, self._model_dir)
        self._pending: dict[str, Fingerprint] = {}  # failed once, files still changing (or not looked at twice)
        self._dir_problem: str | None = None
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
            with os.scandir(self._model_dir) as scan:
                entries = [Path(e.path) for e in scan if not e.name.startswith(".") and e.is_dir()]
        except FileNotFoundError:
            return []  # the trainer may create it later
        except OSError as err:
            self._dir_unreadable(str(err))
            return []
        self._dir_problem = None
        names = {p.name for p in entries}
        self._rejects.keep_only(names)
        self._pending = {k: v for k, v in self._pending.items() if k in names}
        return sorted(entries, key=lambda p: p.name, reverse=True)

    def _dir_unreadable(self, reason: str) -> None:
        if reason != self._dir_problem:  # once per problem, not once per poll
            self._log.warning("model_dir_unreadable", path=str(self._model_dir), reason=reason)
        self._dir_problem = reason

    def _is_newer(self, path: Path) -> bool:
        current = self._current
        if current is None or current.path.parent != self._model_dir:
            return True  # the bundled model yields to any valid version in the model directory
        return path.name > current.path.name

    def _newest_valid(self, candidates: list[Path]) -> ServingModel[T] | None:
        for path in candidates:
            fingerprint = _fingerprint(path)
            if fingerprint is None or self._rejects.get(path.name) == fingerprint:
                continue
            found = self._try(path, fingerprint)
            if found is not None:
                self._pending.pop(path.name, None)
                return found
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

    def _try(self, path: Path, fingerprint: Fingerprint | None = None) -> ServingModel[T] | None:
        """Read, validate and prepare one version; None if it is pending or rejected (one log line each).
        Without a fingerprint (the bundled model) a failure is a rejection at once."""
        if path.is_symlink():
            return self._reject(path, fingerprint, "a symbolic link; a version must be a directory", "untrusted")
        try:
            model, manifest = self._read(path)
        except TimeoutError:
            reason = f"reading took longer than {self._reading.timeout_s:g}s (a hung filesystem?); left behind"
            return self._reject(path, fingerprint, reason, "read_timeout")
        except (CheckpointError, OSError) as err:
            return self._failed_read(path, fingerprint, str(err), "invalid_checkpoint")
        except Exception as err:  # noqa: BLE001 - no manifest, however hostile, may stop the model that serves
            return self._failed_read(path, fingerprint, f"{type(err).__name__}: {err}", "read_error")
        try:
            runner = self._prepare(model, manifest)
        except ValueError as err:
            return self._reject(path, fingerprint, str(err), "prepare_failed")
        except Exception as err:  # a bad candidate must never stop the model that is serving
            return self._reject(path, fingerprint, f"{type(err).__name__}: {err}", "prepare_error", exc_info=err)
        return ServingModel(runner=runner, manifest=manifest, path=path)

    def _read(self, path: Path) -> tuple[RepNet, Manifest]:
        """`load_checkpoint` on a daemon thread, given `timeout_s` (TimeoutError after it)."""
        r = self._reading
        read = start_daemon(lambda: load_checkpoint(path, r.limits, r.batch), name=f"model-read-{path.name[:40]}")
        return read.result(timeout=r.timeout_s)

    def _failed_read(self, path: Path, fingerprint: Fingerprint | None, reason: str, kind: str) -> None:
        """Pending while the version's files change (or were looked at once only); rejected once they do not."""
        after = _fingerprint(path)
        if fingerprint is None or after == fingerprint == self._pending.get(path.name):
            return self._reject(path, fingerprint, reason, kind)
        if path.name not in self._pending:
            self._log.info("model_pending", version=path.name, path=str(path), reason=reason,
                           note="retried while its files change; rejected once they stay unchanged")
        self._pending[path.name] = after or fingerprint
        return None

    def _reject(self, path: Path, fingerprint: Fingerprint | None, reason: str, kind: str,
                exc_info: BaseException | None = None) -> None:
        """One log line with the full reason (and its bounded `kind`); one failed reload counted; remembered."""
        serving = self._current.version if self._current is not None else None
        extra = {"exc_info": exc_info} if exc_info is not None else {}
        self._log.warning("model_rejected", version=path.name, path=str(path), reason=reason, kind=kind,
                          serving=serving, **extra)
        self._metrics.model_reload(False)
        self._pending.pop(path.name, None)
        if fingerprint is not None:
            self._rejects.add(path.name, fingerprint)
        return None

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


class Rejects:
    """Rejected versions by name → fingerprint, of one model directory; kept in `path` too when given, so they
    outlive a restart (JSON, replaced atomically; a missing, unreadable or foreign file means none)."""

    def __init__(self, path: Path | None, model_dir: Path | None) -> None:
        self._path = path
        self._key = str(model_dir.resolve()) if model_dir is not None else ""
        self._log = structlog.get_logger(__name__)
        self._by_name: dict[str, Fingerprint] = self._load()

    def get(self, name: str) -> Fingerprint | None:
        return self._by_name.get(name)

    def add(self, name: str, fingerprint: Fingerprint) -> None:
        self._by_name[name] = fingerprint
        self._save()

    def keep_only(self, names: set[str]) -> None:
        if self._by_name.keys() - names:
            self._by_name = {k: v for k, v in self._by_name.items() if k in names}
            self._save()

    def _all(self) -> dict[str, dict[str, list]]:
        if self._path is None:
            return {}
        try:
            doc = json.loads(read_regular(self._path, self._path.parent, MAX_REJECTS_FILE_BYTES))
        except FileNotFoundError:
            return {}
        except (CheckpointError, OSError, ValueError) as err:
            self._log.warning("model_rejects_unreadable", path=str(self._path), reason=str(err))
            return {}
        return doc if isinstance(doc, dict) else {}

    def _load(self) -> dict[str, Fingerprint]:
        mine = self._all().get(self._key, {})
        try:
            return {name: tuple((str(n), int(s), int(m), int(i)) for n, s, m, i in fp) for name, fp in mine.items()}
        except (TypeError, ValueError, AttributeError):
            return {}

    def _save(self) -> None:
        if self._path is None:
            return
        doc = self._all() | {self._key: {name: [list(f) for f in fp] for name, fp in self._by_name.items()}}
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self._path)
        except OSError as err:
            self._log.warning("model_rejects_not_saved", path=str(self._path), reason=str(err),
                              note="rejections are remembered in memory only")


def _fingerprint(path: Path) -> Fingerprint | None:
    """Names, sizes, mtimes and inodes of a version's files (symbolic links not followed); None if it vanished."""
    try:
        with os.scandir(path) as entries:
            stats = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
    except OSError:
        return None
    return tuple(sorted((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats))
