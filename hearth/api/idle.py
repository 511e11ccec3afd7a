"""The stream idle bound: one timer for every open stream, not one per stream.

A timer per streamed response is a schedule and a cancel on every request
(most streams end long before any bound). Here a stream is a set entry with
the time it last sent something; one sweep every `period` seconds, armed
only while streams are open, cuts those silent for `idle` seconds or more.
A silent stream ends between `idle` and `idle + period` seconds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Watched(Protocol):
    """What the sweeper needs of a stream."""

    last: float  # time.monotonic() of its last piece

    def idle_out(self) -> None:
        """Called once when the stream has been silent too long."""


class IdleSweeper:
    """Cuts streams silent for `idle` seconds; see the module docstring."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.period = min(idle / 4, 1.0)
        self._streams: set[Watched] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, stream: Watched) -> None:
        """Start bounding `stream` (its `last` is now)."""
        stream.last = time.monotonic()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new loop (tests): the old one's timer is gone with it
            self._loop, self._handle = loop, None
            self._streams.clear()
        self._streams.add(stream)
        if self._handle is None:
            self._handle = loop.call_later(self.period, self._sweep)

    def forget(self, stream: Watched) -> None:
        """Stop bounding `stream` (it ended)."""
        self._streams.discard(stream)

    def _sweep(self) -> None:
        self._handle = None
        now = time.monotonic()
        silent = [s for s in self._streams if now - s.last >= self.idle]
        for s in silent:
            self._streams.discard(s)
            s.idle_out()
        if self._streams and self._loop is not None:
            self._handle = self._loop.call_later(self.period, self._sweep)
