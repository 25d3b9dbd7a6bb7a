"""The console in this process against the local broker: what its HTTP side answers."""

from __future__ import annotations

import asyncio
from typing import Any

import cv2
import numpy as np
import orjson
import pytest

from inspector.codec import dumps
from inspector.console.app import RunningConsole, running_console
from tests.helpers.streams import Frame, encoded_frame, produce

pytestmark = pytest.mark.kafka


async def wait_for(console: RunningConsole, check, what: str, timeout_s: float = 20.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            stats = console.board.stats()
            if check(stats):
                return stats
            await asyncio.sleep(0.05)


async def joined(console: RunningConsole) -> None:
    await wait_for(console, lambda s: s["kafka"]["partitions"] > 0, "the console's group join")


def message(doc: Any, key: bytes = b"cam-1") -> Frame:
    return Frame(key, doc if isinstance(doc, bytes) else dumps(doc), [], "")


def test_events_dead_letters_and_pictures_over_http(kafka_broker, new_topic, console_settings, make_event,
                                                    make_dead_letter, fetch) -> None:
    frames, events, dlq = new_topic(), new_topic(), new_topic()
    settings = console_settings(bootstrap_servers=kafka_broker, topic=events, dead_letter_topic=dlq,
                                picture_timeout_s=1.0, max_picture_bytes=5000)
    pixels = np.arange(48 * 32, dtype=np.uint8).reshape(32, 48)
    rgb = np.stack([pixels, 255 - pixels, pixels // 2], axis=-1)
    ok, png = cv2.imencode(".png", pixels)

    async def scenario() -> None:
        async with running_console(settings) as console:
            await joined(console)
            acks = await produce(kafka_broker, frames, [
                encoded_frame("raw-1", pixels.tobytes(), "raw", width=48, height=32),
                encoded_frame("png-1", png.tobytes(), "png"),
                encoded_frame("rgb-1", rgb.tobytes(), "raw", width=48, height=32, pixel_format="rgb8")])
            sent = [make_event(f"f{i}", topic=frames, offset=ack.offset, coil_id="C-1", strip_offset_m=3.0 * i)
                    for i, ack in enumerate(acks)]
            await produce(kafka_broker, events, [message(e) for e in [*sent, sent[0]]] + [message(b"{not json")])
            await produce(kafka_broker, dlq, [message(make_dead_letter("undecodable"))])
            stats = await wait_for(console, lambda s: s["events"] == 3 and s["duplicates"] == 1
                                   and s["dead_letters"]["total"] == 1 and s["invalid"], "the messages")
            assert stats["invalid"] == {events: 1}
            assert stats["dead_letters"]["by_reason"] == {"undecodable": 1}

            status, headers, body = await fetch(console.url + "api/state")
            assert status == 200 and orjson.loads(body)["events"] == 3
            assert orjson.loads(body)["wall_cards"] == settings.wall_cards  # the page trims its wall to it
            assert "script-src 'self'" in headers["Content-Security-Policy"]
            assert headers["X-Content-Type-Options"] == "nosniff"

            # raw frames come back as PNG, PNG frames as they are
            for event, image in zip(sent, [pixels, pixels, rgb[..., ::-1]]):  # OpenCV reads colour as BGR
                status, headers, body = await fetch(console.url + f"frames/{frames}/0/{event.source.offset}")
                assert status == 200 and headers["Content-Type"] == "image/png"
                np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED), image)
            assert (await fetch(console.url + f"frames/{frames}/0/1"))[2] == png.tobytes()
            assert console.pictures.fetches == 3 and console.pictures.hits == 1  # cached
            assert (await fetch(console.url + f"frames/{events}/0/0"))[0] == 404  # not a frames topic
            assert (await fetch(console.url + f"frames/{frames}/0/99"))[0] == 504
            (big,) = await produce(kafka_broker, frames,
                                   [encoded_frame("big", bytes(6000), "raw", width=100, height=60)])
            status, _, body = await fetch(console.url + f"frames/{frames}/0/{big.offset}")
            assert status == 422 and b"6000 bytes" in body  # over max_picture_bytes

            status, _, body = await fetch(console.url + f"api/event?id={sent[1].event_id}")
            assert status == 200 and orjson.loads(body)["probabilities"] == sent[1].probabilities
            status, _, body = await fetch(console.url + "api/coil?id=C-1")
            assert status == 200 and orjson.loads(body)["points"][1][:2] == [3.0, "crazing"]
            assert (await fetch(console.url + "api/coil?id=nope"))[0] == 404
            assert (await fetch(console.url, method="POST"))[0] == 405  # read-only

    asyncio.run(scenario())


def test_stream_sends_figures_then_cards(kafka_broker, new_topic, console_settings, make_event) -> None:
    events = new_topic()
    settings = console_settings(bootstrap_servers=kafka_broker, topic=events, dead_letter_topic=new_topic(),
                                tick_s=0.05)

    async def read_stream(url: str) -> list[tuple[str, Any]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/")))
        writer.write(b"GET /stream?camera=cam-2 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"text/event-stream" in head
        seen: list[tuple[str, Any]] = []
        async with asyncio.timeout(20):
            while not any(kind == "cards" and data for kind, data in seen):
                block = await reader.readuntil(b"\n\n")
                lines = [line for line in block.split(b"\n") if line.startswith((b"event:", b"data:"))]
                if len(lines) == 2:  # chunked transfer adds size lines; the event is the two we want
                    seen.append((lines[0][6:].strip().decode(), orjson.loads(lines[1][5:])))
        writer.close()
        return seen

    async def scenario() -> None:
        async with running_console(settings) as console:
            await joined(console)
            stream = asyncio.create_task(read_stream(console.url))
            await asyncio.sleep(0.3)
            await produce(kafka_broker, events, [message(make_event(f"f{i}", camera_id=f"cam-{i % 3}"))
                                                 for i in range(6)])
            seen = await stream
            assert seen[0][0] == "stats" and seen[1] == ("cards", [])
            cards = [card for kind, data in seen if kind == "cards" for card in data]
            assert {card["camera_id"] for card in cards} == {"cam-2"}  # the stream's filter

    asyncio.run(scenario())


def test_a_console_starts_from_the_latest_events_unless_told_to_replay(kafka_broker, new_topic, console_settings,
                                                                      make_event) -> None:
    events, dlq = new_topic(), new_topic()

    async def scenario() -> None:
        for i in range(3):  # one record batch each: tansu's "latest" is its last batch's base offset + 1
            await produce(kafka_broker, events, [message(make_event(f"old-{i}"))])
        # two consoles in one process: each its own group (the default is one per process)
        async with running_console(console_settings(bootstrap_servers=kafka_broker, topic=events,
                                                    dead_letter_topic=dlq, group_id=f"{events}-a")) as latest, \
                running_console(console_settings(bootstrap_servers=kafka_broker, topic=events, dead_letter_topic=dlq,
                                                 group_id=f"{events}-b", from_beginning=True)) as replay:
            await asyncio.gather(joined(latest), joined(replay))
            await produce(kafka_broker, events, [message(make_event("new"))])
            await wait_for(replay, lambda s: s["events"] == 4, "the replaying console")
            assert (await wait_for(latest, lambda s: s["events"] >= 1, "the new event"))["events"] == 1

    asyncio.run(scenario())


def test_the_picture_cache_and_the_pages_are_bounded(kafka_broker, new_topic, console_settings, make_event,
                                                     fetch) -> None:
    """Pictures of ~10 kB each in a 24 kB cache: at most two stay, the least recently used goes first.
    One page at a time (max_clients 1): a second stream is refused."""
    frames, events = new_topic(), new_topic()
    settings = console_settings(bootstrap_servers=kafka_broker, topic=events, dead_letter_topic=new_topic(),
                                picture_cache_mb=24_000 / 2**20, max_clients=1)
    rng = np.random.default_rng(0)
    pngs = [cv2.imencode(".png", rng.integers(0, 256, (100, 100), dtype=np.uint8))[1].tobytes() for _ in range(3)]

    async def scenario() -> None:
        async with running_console(settings) as console:
            await joined(console)
            acks = await produce(kafka_broker, frames,
                                 [encoded_frame(f"p{i}", png, "png") for i, png in enumerate(pngs)])
            await produce(kafka_broker, events, [message(make_event("e", topic=frames, offset=acks[0].offset))])
            await wait_for(console, lambda s: s["events"] == 1, "the event naming the frames topic")
            urls = [console.url + f"frames/{frames}/0/{ack.offset}" for ack in acks]
            for url, png in zip(urls, pngs):
                assert (await fetch(url))[2] == png
            assert console.pictures.cached_bytes <= settings.picture_cache_bytes
            await fetch(urls[2])  # cached: the newest
            await fetch(urls[0])  # evicted by the third: fetched again
            assert (console.pictures.fetches, console.pictures.hits) == (4, 1)

            host, port = console.url.removeprefix("http://").strip("/").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"text/event-stream" in await reader.readuntil(b"\r\n\r\n")
            assert (await fetch(console.url + "stream"))[0] == 503  # too many pages open
            writer.close()

    asyncio.run(scenario())
