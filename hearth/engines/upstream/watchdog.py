"""One timer per upstream request for its first-token and idle timeouts.

`asyncio.timeout` schedules and cancels a timer for every read (about 8 us
each here, twice or more per proxied request). A Watchdog keeps one timer for
the whole request: moving the deadline is a float store, and the timer only
re-arms itself when it wakes up early.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Watchdog:
    """Cancels the awaiting task when a deadline (loop time) passes; `within` turns that into TimeoutError.

    Only awaits run through `within` are watched: time spent between them (a
    slow client being written to) never counts. Call `close()` when done.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0  # when the timer wakes up
        self._task: asyncio.Task[object] | None = None  # the task awaiting in `within`
        self._deadline = 0.0
        self._fired = False

    def now(self) -> float:
        """The loop's clock, the one deadlines use."""
        return self._loop.time()

    async def within(self, deadline: float, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`; TimeoutError if it is still pending at `deadline`."""
        self._deadline = deadline
        self._task = task = asyncio.current_task(self._loop)  # with the loop: no lookup of it
        if self._handle is None or deadline < self._at:
            if self._handle is not None:
                self._handle.cancel()
            self._at = deadline
            self._handle = self._loop.call_at(deadline, self._wake)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._fired and task is not None:
                self._fired = False
                if task.uncancel() == 0:  # ours alone: nobody else cancelled the task
                    raise TimeoutError from None
            raise
        finally:
            self._task = None
            if self._fired and task is not None:  # fired, but the await finished first
                self._fired = False
                task.uncancel()

    def _wake(self) -> None:
        self._handle = None
        task = self._task
        if task is None:  # nothing awaited right now; the next `within` re-arms
            return
        if self._loop.time() < self._deadline:  # the deadline moved since the timer was set
            self._at = self._deadline
            self._handle = self._loop.call_at(self._deadline, self._wake)
            return
        self._fired = True
        task.cancel()

    def close(self) -> None:
        """Drop the timer."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
