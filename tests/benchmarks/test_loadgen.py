import asyncio

from benchmarks.loadgen import EventReader, Offered


def _offered(n: int) -> Offered:
    return Offered(prefix="p", sent={f"p/{i}": 0.0 for i in range(n)})


async def _trickle(reader: EventReader, events: int, every_s: float) -> None:
    for _ in range(events):
        await asyncio.sleep(every_s)
        reader.per_prefix["p"] += 1


def test_the_drain_waits_while_a_backlog_still_drains_and_stops_when_events_stop():
    async def main() -> tuple[bool, bool, bool]:
        reader = EventReader("127.0.0.1:1", "t")  # never started: the events are counted by hand
        # 8 events 0.1 s apart: 0.8 s in all, longer than the 0.5 s a stall may last
        feeding = asyncio.create_task(_trickle(reader, 8, 0.1))
        drained = await reader.wait_for(_offered(8), timeout_s=0.5, limit_s=5)
        await feeding
        reader.per_prefix["p"] = 0
        feeding = asyncio.create_task(_trickle(reader, 2, 0.05))  # 2 of 8, then nothing
        stalled = await reader.wait_for(_offered(8), timeout_s=0.5, limit_s=5)
        await feeding
        reader.per_prefix["p"] = 0
        feeding = asyncio.create_task(_trickle(reader, 8, 0.1))
        limited = await reader.wait_for(_offered(8), timeout_s=0.5, limit_s=0.3)
        await feeding
        return drained, stalled, limited

    assert asyncio.run(main()) == (True, False, False)
