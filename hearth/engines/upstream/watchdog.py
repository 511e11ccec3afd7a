"""First-token and idle timeouts of upstream requests: one timer for all of them.

`asyncio.timeout` schedules and cancels a timer for every read (about 8 us
each here, twice or more per proxied request); even one timer per request is
a schedule and a cancel (2-3 us) on every request, though nearly all finish
long before any timeout. So the watchdogs of one engine share `Deadlines`:
a set of the awaits being watched and one timer at the earliest deadline
among them. A new await with a later deadline than the timer's (the usual
case) costs a set entry; the timer, when it wakes, cancels what is overdue
and re-arms for the earliest deadline left, if any.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Deadlines:
    """One timer for many watchdogs (see the module docstring); one per engine."""

    def __init__(self) -> None:
        self._watched: set[Watchdog] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0  # when the timer wakes up
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, dog: Watchdog) -> None:
        """Watch `dog`'s current await until its deadline."""
        loop = dog.loop
        if loop is not self._loop:  # first use, or a new loop (tests): the old one's timer is gone with it
            self._loop, self._handle = loop, None
            self._watched.clear()
        self._watched.add(dog)
        deadline = dog.deadline
        if self._handle is None or deadline < self._at:
            if self._handle is not None:
                self._handle.cancel()
            self._arm(loop, deadline)

    def forget(self, dog: Watchdog) -> None:
        """`dog`'s await is over."""
        self._watched.discard(dog)

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        self._at = at
        self._handle = loop.call_at(at, self._wake)

    def _wake(self) -> None:
        self._handle = None
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        overdue = [d for d in self._watched if d.deadline <= now]
        for dog in overdue:
            self._watched.discard(dog)
            dog.fire()
        if self._watched:
            self._arm(loop, min(d.deadline for d in self._watched))


class Watchdog:
    """Cancels the awaiting task when a deadline (loop time) passes; `within` turns that into TimeoutError.

    Only awaits run through `within` are watched: time spent between them (a
    slow client being written to) never counts. Call `close()` when done.
    """

    def __init__(self, deadlines: Deadlines | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.deadlines = deadlines if deadlines is not None else Deadlines()
        self.deadline = 0.0
        self._task: asyncio.Task[object] | None = None  # the task awaiting in `within`
        self._fired = False

    def now(self) -> float:
        """The loop's clock, the one deadlines use."""
        return self.loop.time()

    async def within(self, deadline: float, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`; TimeoutError if it is still pending at `deadline`."""
        self.deadline = deadline
        self._task = task = asyncio.current_task(self.loop)  # with the loop: no lookup of it
        self.deadlines.watch(self)
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
            self.deadlines.forget(self)
            if self._fired and task is not None:  # fired, but the await finished first
                self._fired = False
                task.uncancel()

    def fire(self) -> None:
        """The deadline passed (called by `Deadlines`): cancel the task awaiting now."""
        task = self._task
        if task is not None:
            self._fired = True
            task.cancel()

    def close(self) -> None:
        """Stop watching (an await in progress is no longer bounded)."""
        self.deadlines.forget(self)
