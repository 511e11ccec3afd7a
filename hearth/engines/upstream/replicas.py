"""Replicas of one upstream: least-outstanding-requests balancing and health.

A replica that fails (refused connection, timeout) is ejected at once, and one
that answers 5xx (but 501) when another replica then does the same request;
active health checks re-admit it when it answers again (a cloud replica, which
gets no health checks, is tried again after a probation period). When every
replica is ejected, requests still try them (a last resort that also notices
recovery before the next health check).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("hearth.upstream")


@dataclass(eq=False)
class Replica:
    """One base URL of an upstream and what hearth knows about it."""

    url: str
    outstanding: int = 0
    healthy: bool = True
    failures: int = 0
    served: int = 0
    last_error: str = ""
    ejected_at: float = 0.0


Probe = Callable[[Replica], Awaitable[None]]


class ReplicaPool:
    """Picks replicas, counts outstanding requests, ejects and re-admits."""

    def __init__(self, upstream: str, urls: list[str]) -> None:
        self.upstream = upstream
        self.replicas = [Replica(url.rstrip("/")) for url in urls]
        self._turn = 0
        self._health: asyncio.Task[None] | None = None
        self.probation = 0.0  # > 0: without health checks, an ejected replica is tried again after this long

    def pick(self, tried: set[Replica]) -> Replica | None:
        """The healthy untried replica with the fewest requests in flight.

        Ties rotate so that sequential requests spread too. With no healthy
        replica left, an ejected untried one is returned (last resort).
        """
        if len(self.replicas) == 1:  # the common case: no lists to build
            only = self.replicas[0]
            return None if only in tried else only
        candidates = [r for r in self.replicas if r not in tried]
        if not candidates:
            return None
        now = time.monotonic() if self.probation else 0.0
        healthy = [r for r in candidates
                   if r.healthy or (self.probation and now - r.ejected_at >= self.probation)] or candidates
        self._turn += 1
        n = len(healthy)
        best = healthy[self._turn % n]
        for i in range(1, n):
            r = healthy[(self._turn + i) % n]
            if r.outstanding < best.outstanding:
                best = r
        return best

    def acquire(self, replica: Replica) -> None:
        """Count a request as in flight on `replica`."""
        replica.outstanding += 1

    def release(self, replica: Replica) -> None:
        """A request on `replica` is over."""
        replica.outstanding -= 1

    def succeeded(self, replica: Replica) -> None:
        """`replica` answered: it is healthy."""
        replica.served += 1
        replica.failures = 0
        if not replica.healthy:
            log.info("upstream %s: replica %s answers again; re-admitted", self.upstream, replica.url)
            replica.healthy = True

    def failed(self, replica: Replica, reason: str) -> None:
        """`replica` failed: eject it until a health check succeeds."""
        replica.failures += 1
        replica.last_error = reason
        if replica.healthy:
            log.warning("upstream %s: replica %s ejected: %s", self.upstream, replica.url, reason)
            replica.healthy = False
        replica.ejected_at = time.monotonic()  # a failed retry on probation waits a whole period again

    def healthy_count(self) -> int:
        """How many replicas are in rotation."""
        return sum(r.healthy for r in self.replicas)

    def start_health_checks(self, probe: Probe, interval: float) -> None:
        """Probe every replica every `interval` seconds (probe raises on failure)."""
        if self._health is None:
            self._health = asyncio.ensure_future(self._health_loop(probe, interval))

    async def stop(self) -> None:
        """Stop health checks."""
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
            self._health = None

    async def _health_loop(self, probe: Probe, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(self._check(probe, r) for r in self.replicas))

    async def _check(self, probe: Probe, replica: Replica) -> None:
        try:
            await probe(replica)
        except Exception as exc:  # any failure of a probe means "not healthy"
            if replica.healthy:
                self.failed(replica, f"health check failed: {describe(exc)}")
            return
        if not replica.healthy:
            self.succeeded(replica)
            replica.served -= 1  # a probe is not a served request


def describe(exc: BaseException) -> str:
    """A short, key-free description of a connection error."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
