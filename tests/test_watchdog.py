"""The upstream Watchdog: one timer per request, moving deadlines, and cancels that are not its own."""

from __future__ import annotations

import asyncio
import time

import pytest

from hearth.engines.upstream.watchdog import Deadlines, Watchdog


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def test_pending_past_the_deadline_is_a_timeout_and_the_task_is_not_left_cancelled() -> None:
    async def main() -> None:
        dog = Watchdog()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await dog.within(dog.now() + 0.1, asyncio.sleep(5))
        assert 0.08 < time.monotonic() - t0 < 1.0
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        # The same watchdog watches the next await with a fresh deadline.
        assert await dog.within(dog.now() + 1, asyncio.sleep(0.01, result="ok")) == "ok"
        await asyncio.sleep(0.05)  # no stray cancel arrives later
        dog.close()

    run(main())


def test_a_later_deadline_is_honoured_after_an_early_timer_and_an_earlier_one_rearms() -> None:
    async def main() -> None:
        dog = Watchdog()
        assert await dog.within(dog.now() + 0.05, asyncio.sleep(0.01, result=1)) == 1
        # The timer set for +0.05 wakes during this await and must not fire: the deadline is later.
        assert await dog.within(dog.now() + 0.5, asyncio.sleep(0.2, result=2)) == 2
        dog.close()
        # A deadline earlier than the pending timer fires on time.
        dog = Watchdog()
        await dog.within(dog.now() + 10, asyncio.sleep(0))
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await dog.within(dog.now() + 0.1, asyncio.sleep(5))
        assert time.monotonic() - t0 < 1.0
        dog.close()

    run(main())


def test_time_between_awaits_does_not_count() -> None:
    async def main() -> None:
        dog = Watchdog()
        assert await dog.within(dog.now() + 0.1, asyncio.sleep(0, result="a")) == "a"
        await asyncio.sleep(0.3)  # past the deadline, but nothing is being watched
        assert await dog.within(dog.now() + 0.1, asyncio.sleep(0.01, result="b")) == "b"
        dog.close()

    run(main())


def test_someone_elses_cancel_stays_a_cancel() -> None:
    async def main() -> None:
        dog = Watchdog()
        inner = asyncio.create_task(dog.within(dog.now() + 5, asyncio.sleep(5)))
        await asyncio.sleep(0.05)
        inner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await inner
        dog.close()

    run(main())


def test_the_watched_task_is_the_one_awaiting_now() -> None:
    """A generation may be read from another task than the one that opened it."""
    async def main() -> None:
        dog = Watchdog()
        await dog.within(dog.now() + 5, asyncio.sleep(0))

        async def reader() -> str:
            await dog.within(dog.now() + 0.1, asyncio.sleep(5))
            return "not reached"

        with pytest.raises(TimeoutError):
            await asyncio.create_task(reader())
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        dog.close()

    run(main())


def test_dogs_sharing_deadlines_each_time_out_at_their_own_deadline_with_one_timer() -> None:
    async def main() -> None:
        shared = Deadlines()
        early, late, done = Watchdog(shared), Watchdog(shared), Watchdog(shared)
        t0 = time.monotonic()
        ended: dict[str, float] = {}

        async def watched(name: str, dog: Watchdog, timeout: float, work: float) -> None:
            try:
                await dog.within(dog.now() + timeout, asyncio.sleep(work))
                ended[name] = -(time.monotonic() - t0)  # finished: negative
            except TimeoutError:
                ended[name] = time.monotonic() - t0

        # the late one is watched first, so the timer is armed for it and must move earlier for `early`
        await asyncio.gather(watched("late", late, 0.4, 5), watched("early", early, 0.1, 5),
                             watched("done", done, 0.2, 0.01))
        assert 0.08 < ended["early"] < 0.3 and 0.38 < ended["late"] < 0.8 and ended["done"] < 0
        assert not shared._watched and shared._handle is None  # nothing left: no timer pending
        for dog in (early, late, done):
            dog.close()

    run(main())
