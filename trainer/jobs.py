"""Long per-item work (a CV fold, an open-set split) in `jobs` processes at once, each stopping with its parent."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TypeVar

from stripnet.allocator import keep_freed_memory

Item = TypeVar("Item")
Result = TypeVar("Result")


def _child(parent: int) -> None:
    """Pool initializer: the allocator `trainer` runs with, and a child that stops when its parent is killed,
    instead of training on as an orphan."""
    keep_freed_memory()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def in_processes(fn: Callable[[Item], Result], items: Iterable[Item], jobs: int) -> Iterator[tuple[Item, Result]]:
    """(item, fn(item)) in the order they finish; `fn` must be picklable (a module-level function or a partial)."""
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_child, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(fn, item): item for item in items}
        for future in as_completed(futures):
            yield futures[future], future.result()
