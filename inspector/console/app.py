"""The console's composition root: board, reader, pictures and web server, built from its settings.

`running_console(settings)` serves until its block ends (`inspector demo` and the tests run it in their
own process); `run_console(settings)` is the command: it serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from aiohttp import web

from inspector.console.board import Board
from inspector.console.pictures import PictureCache
from inspector.console.reader import EventReader, serve_pictures
from inspector.console.server import Parts, build_app
from inspector.console.settings import ConsoleSettings

SHUTDOWN_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class RunningConsole:
    url: str
    board: Board
    pictures: PictureCache


@contextlib.asynccontextmanager
async def running_console(settings: ConsoleSettings) -> AsyncIterator[RunningConsole]:
    board = Board(settings)
    pictures = PictureCache(settings.picture_cache_bytes, settings.max_pixels, settings.picture_timeout_s,
                            settings.max_picture_bytes)
    stop = asyncio.Event()
    runner = web.AppRunner(build_app(Parts(settings, board, pictures, stop)), access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    tasks: list[asyncio.Task[None]] = []
    try:
        site = web.TCPSite(runner, settings.host, settings.http_port)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"
        tasks = [asyncio.create_task(EventReader(settings, board).run(stop)),
                 asyncio.create_task(serve_pictures(settings, pictures, stop))]
        structlog.get_logger(__name__).info("console_listening", url=url, topic=settings.topic,
                                            bootstrap_servers=settings.bootstrap_servers)
        yield RunningConsole(url, board, pictures)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()


async def until_signalled() -> None:
    """Return on SIGINT or SIGTERM (the handlers are this function's only while it waits)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def run_console(settings: ConsoleSettings) -> int:
    async with running_console(settings):
        await until_signalled()
    return 0
