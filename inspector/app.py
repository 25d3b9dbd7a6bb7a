"""The composition root: the one place the inspector is assembled from its settings.

`build(settings)` is what `inspector run`, `inspector demo`, the tests and the benchmarks run: the
runner chosen once (inspector/runners.py), the model store that loads and swaps models with it, the
one metrics object, and the service (the pipeline, inspector/service.py). `run_inspector` is the
process around it for `inspector run`: the HTTP endpoint, signals and the exit code.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
import torch

from inspector.endpoints import PATHS, serve_http
from inspector.metrics import Metrics
from inspector.model_store import ModelStore, NoValidModelError, ReadPolicy
from inspector.runners import Loader, Runner
from inspector.service import InspectorService, Models
from inspector.settings import Settings
from schemas.checkpoint import Manifest
from stripnet.allocator import keep_freed_memory
from stripnet.network import RepNet


@dataclass(frozen=True)
class Inspector:
    settings: Settings
    loader: Loader
    metrics: Metrics
    models: Models
    service: InspectorService


def build(settings: Settings, *, metrics: Metrics | None = None, models: Models | None = None) -> Inspector:
    """The inspector for `settings`. `models` replaces the model store (tests wrap one to time or break it;
    give it the same `metrics`). Raises BackendUnavailableError when the chosen backend is not installed."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)  # process-wide: intra-op threads for CPU inference
    if settings.keep_freed_memory:
        keep_freed_memory()
    metrics = metrics if metrics is not None else Metrics()
    loader = Loader(settings, metrics=metrics)
    models = models if models is not None else model_store(settings, loader.load, metrics)
    return Inspector(settings, loader, metrics, models, InspectorService(settings, models, metrics))


def model_store(settings: Settings, prepare: Callable[[RepNet, Manifest], Runner],
                metrics: Metrics) -> ModelStore[Runner]:
    """The model store for `settings`: the model directory read within its limits, rejects remembered."""
    reading = ReadPolicy(settings.model_limits, batch=settings.max_batch, timeout_s=settings.model_read_timeout_s)
    return ModelStore(settings.model_dir, prepare, metrics=metrics, reading=reading,
                      rejects_file=settings.model_rejects_file)


async def run_inspector(settings: Settings) -> int:
    """`inspector run`: the inspector and its HTTP endpoint until SIGINT/SIGTERM. Returns the exit code."""
    log = structlog.get_logger(__name__)
    inspector = build(settings)
    log.info("inspector_starting", device=str(inspector.loader.options.device), backend=inspector.loader.runner.name,
             threads=torch.get_num_threads(), bootstrap_servers=settings.bootstrap_servers,
             model_dir=str(settings.model_dir or "bundled"))
    try:
        async with serve_http(inspector.metrics, settings.http_host, settings.http_port) as endpoint:
            log.info("http_listening", url=endpoint.url, host=endpoint.host, port=endpoint.port, paths=list(PATHS))
            await run_until_signalled(inspector.service.run, asyncio.Event())
    except NoValidModelError as err:
        log.error("no_model", reason=str(err))
        return 2
    except Exception as group:  # noqa: BLE001 - one clear line instead of a traceback storm
        err = first_error(group)
        inspector.metrics.failed(f"{type(err).__name__}: {err}")
        log.error("inspector_failed", error=f"{type(err).__name__}: {err}", exc_info=err)
        return 1
    return 0


async def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]], stop: asyncio.Event) -> None:
    """Run `main(stop)`; SIGINT/SIGTERM set `stop`, a second signal cancels outright."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and task is not None:
            task.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await main(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def first_error(err: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group, for a one-line report."""
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    return err
