"""The console's web side (aiohttp): the page, its live stream, a few JSON reads and the pictures.

    GET /                     the page (static files of this package)
    GET /stream?label=&status=&camera=   server-sent events: `stats` every stats_interval_s, `cards` every tick
    GET /api/state            the figures as JSON
    GET /api/event?id=UUID    one event in full (while it is among the recent ones)
    GET /api/coil?id=COIL     a coil's defects along the strip
    GET /frames/{topic}/{partition}/{offset}   a frame's picture (only from topics events named)

Read-only: GET and HEAD only. Every response carries a Content-Security-Policy that allows this origin's
own script and nothing inline, so even text that slipped into markup could not run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import orjson
from aiohttp import web

from inspector.console.board import Board
from inspector.console.pictures import PictureCache, PictureError, picture_path
from inspector.console.settings import ConsoleSettings
from inspector.console.wall import CardFilter, Viewer
from schemas.messages import SourcePosition

STATIC = Path(str(files("inspector.console") / "static"))
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
PICTURE_MAX_AGE_S = 3600  # a position's frame never changes


@dataclass(frozen=True)
class Parts:
    settings: ConsoleSettings
    board: Board
    pictures: PictureCache
    stop: asyncio.Event


PARTS = web.AppKey("parts", Parts)
CLIENTS = web.AppKey("clients", set)


def build_app(parts: Parts) -> web.Application:
    app = web.Application()
    app[PARTS] = parts
    app[CLIENTS] = set()
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/", _index)
    app.router.add_get("/stream", _stream)
    app.router.add_get("/api/state", _state)
    app.router.add_get("/api/event", _event)
    app.router.add_get("/api/coil", _coil)
    app.router.add_get(r"/frames/{topic}/{partition:\d+}/{offset:\d+}", _frame)
    app.router.add_static("/static", STATIC)
    return app


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    response.headers.setdefault("Cache-Control", "no-store")


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


async def _state(request: web.Request) -> web.Response:
    return web.Response(body=request.app[PARTS].board.stats_json(), content_type="application/json")


async def _event(request: web.Request) -> web.Response:
    board = request.app[PARTS].board
    event = board.wall.get(request.query.get("id", ""))
    if event is None:
        return _json({"error": "not among the recent events"}, 404)
    return _json(event.model_dump(mode="json") | {"picture": picture_path(event.source)})


async def _coil(request: web.Request) -> web.Response:
    coil = request.app[PARTS].board.coil(request.query.get("id", ""))
    return _json(coil, 200) if coil is not None else _json({"error": "no such coil"}, 404)


async def _frame(request: web.Request) -> web.Response:
    parts = request.app[PARTS]
    topic = request.match_info["topic"]
    if not parts.board.is_frame_topic(topic):
        return _json({"error": "not a frames topic"}, 404)
    source = SourcePosition(topic=topic, partition=int(request.match_info["partition"]),
                            offset=int(request.match_info["offset"]))
    try:
        picture = await parts.pictures.get(source)
    except PictureError as err:
        return _json({"error": err.reason}, err.status)
    return web.Response(body=picture.body, content_type=picture.content_type,
                        headers={"Cache-Control": f"private, max-age={PICTURE_MAX_AGE_S}, immutable"})


def _sse(event: str, data: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


async def _stream(request: web.Request) -> web.StreamResponse:
    parts, clients = request.app[PARTS], request.app[CLIENTS]
    if len(clients) >= parts.settings.max_clients:
        return _json({"error": "too many pages open"}, 503)
    q = request.query
    viewer = parts.board.viewer(CardFilter(label=q.get("label") or None, status=q.get("status") or None,
                                           camera=q.get("camera") or None))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    clients.add(response)
    try:
        await response.write(_sse("stats", parts.board.stats_json()))
        await response.write(_sse("cards", orjson.dumps(parts.board.open(viewer))))
        await _pump(response, parts, viewer)
    except ConnectionError:
        pass  # the page went away
    finally:
        clients.discard(response)
    return response


async def _pump(response: web.StreamResponse, parts: Parts, viewer: Viewer) -> None:
    loop = asyncio.get_running_loop()
    next_stats = loop.time() + parts.settings.stats_interval_s
    while not parts.stop.is_set():
        try:
            await asyncio.wait_for(parts.stop.wait(), parts.settings.tick_s)
        except TimeoutError:
            pass
        cards = parts.board.take(viewer)
        if cards:
            await response.write(_sse("cards", orjson.dumps(cards)))
        if loop.time() >= next_stats:
            next_stats = loop.time() + parts.settings.stats_interval_s
            await response.write(_sse("stats", parts.board.stats_json()))
