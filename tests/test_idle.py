"""The stream idle bound's one-timer sweeper."""

from __future__ import annotations

import asyncio
import time

from hearth.api.idle import IdleSweeper


class Stream:
    def __init__(self) -> None:
        self.last = 0.0
        self.cut_at: float | None = None

    def idle_out(self) -> None:
        self.cut_at = time.monotonic()


def test_a_silent_stream_is_cut_and_a_busy_one_is_not() -> None:
    async def main() -> tuple[Stream, Stream, float, IdleSweeper]:
        sweeper = IdleSweeper(0.08)
        silent, busy = Stream(), Stream()
        t0 = time.monotonic()
        sweeper.watch(silent)
        sweeper.watch(busy)
        while silent.cut_at is None and time.monotonic() - t0 < 2:
            busy.last = time.monotonic()  # a piece every 10 ms
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.15)  # now the busy one falls silent too: cut only from then on
        sweeper.forget(busy)
        await asyncio.sleep(0.2)
        return silent, busy, t0, sweeper

    silent, busy, t0, sweeper = asyncio.run(main())
    assert silent.cut_at is not None
    assert 0.08 <= silent.cut_at - t0 <= 0.08 + sweeper.period + 0.05  # between idle and idle + period (+ slack)
    assert busy.cut_at is None or busy.cut_at - t0 > 0.15  # only after it fell silent


def test_no_timer_runs_without_streams_and_a_new_loop_rearms() -> None:
    sweeper = IdleSweeper(0.04)

    async def one() -> Stream:
        s = Stream()
        sweeper.watch(s)
        for _ in range(100):
            if s.cut_at is not None:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return s

    first = asyncio.run(one())
    assert first.cut_at is not None
    assert sweeper._handle is None  # nothing open: no sweep scheduled
    second = asyncio.run(one())  # another loop (the first one's is closed): still bounded
    assert second.cut_at is not None
