"""Work that must not hold the process: calls that may hang run on daemon threads, and a wait ends when a stop
is asked for.

A daemon thread is abandoned at exit. The threads of asyncio's default executor (`asyncio.to_thread`) and of a
`ThreadPoolExecutor` are joined instead, so one call stuck there (a read on a hung filesystem) would hold a
SIGTERM'd process for ever; `start_daemon` is for such calls, `unless_stopped` for waiting on them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")

CANCEL_GRACE_S = 1.0  # how long a cancelled piece of work may take to clean up before it is left behind


class Stopped(Exception):
    """The stop event was set before the awaited work finished."""


def start_daemon(fn: Callable[[], T], name: str) -> Future[T]:
    """`fn()` on a new daemon thread; its future. `future.result(timeout)` bounds a synchronous wait and
    `asyncio.wrap_future(future)` makes it awaitable; a thread that never returns is left behind."""
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


async def unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T:
    """The result of `work`, or Stopped once `stop` is set first (`work` is then cancelled, and given
    CANCEL_GRACE_S to finish)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
    raise Stopped


async def on_daemon(fn: Callable[[], T], name: str) -> T:
    """`fn()` on a new daemon thread, awaited; a cancelled wait leaves the thread to finish (or hang) alone."""
    return await asyncio.wrap_future(start_daemon(fn, name))
