"""Per-key request and token limits over sliding windows.

Counts live in memory for speed and are restored from the usage table at
start, so they survive a restart. The windows (`rate_window`, default 60 s,
and `token_window`, default 24 h) and the clock are injectable for tests.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from hearth.core.errors import RateLimited


class Limiter:
    """Enforces `--rpm` and `--tokens-per-day` for each key."""

    def __init__(self, rate_window: float = 60.0, token_window: float = 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.rate_window = rate_window
        self.token_window = token_window
        self.clock = clock
        self._requests: dict[int, deque[float]] = {}
        self._tokens: dict[int, deque[tuple[float, int]]] = {}
        self._token_sum: dict[int, int] = {}

    def restore(self, rows: list[tuple[int, float, int]]) -> None:
        """Replay (key_id, ts, tokens) of past requests, oldest first."""
        for key_id, ts, tokens in rows:
            self._requests.setdefault(key_id, deque()).append(ts)
            self.add_tokens(key_id, tokens, ts)

    def admit(self, key_id: int, rpm: int | None, tokens_per_day: int | None) -> None:
        """Count one request, or raise `RateLimited` with the seconds until it would pass."""
        t = self.clock()
        if tokens_per_day is not None:
            self._check_tokens(key_id, tokens_per_day, t)
        if rpm is not None:
            window = self._requests.setdefault(key_id, deque())
            while window and window[0] <= t - self.rate_window:
                window.popleft()
            if len(window) >= rpm:
                wait = max(1, math.ceil(window[0] + self.rate_window - t))
                raise RateLimited(
                    f"this key is limited to {rpm} requests per {_span(self.rate_window)}; retry in {wait} s "
                    "or ask an admin to raise its --rpm", retry_after=wait)
            window.append(t)

    def _check_tokens(self, key_id: int, limit: int, t: float) -> None:
        entries = self._tokens.get(key_id)
        if not entries:
            return
        total = self._prune(key_id, t)
        if total < limit:
            return
        over = total - limit
        wait = 1
        for ts, n in entries:  # oldest first: when enough of them expire, the key may go on
            over -= n
            if over < 0:
                wait = max(1, math.ceil(ts + self.token_window - t))
                break
        raise RateLimited(
            f"this key used {total} of its {limit} tokens per {_span(self.token_window)}; retry in {wait} s "
            "or ask an admin to raise its --tokens-per-day", retry_after=wait)

    def _prune(self, key_id: int, t: float) -> int:
        entries = self._tokens[key_id]
        while entries and entries[0][0] <= t - self.token_window:
            self._token_sum[key_id] -= entries.popleft()[1]
        return self._token_sum[key_id]

    def add_tokens(self, key_id: int, tokens: int, ts: float | None = None) -> None:
        """Count the tokens a finished request used."""
        if tokens <= 0:
            return
        self._tokens.setdefault(key_id, deque()).append((self.clock() if ts is None else ts, tokens))
        self._token_sum[key_id] = self._token_sum.get(key_id, 0) + tokens


def _span(seconds: float) -> str:
    """60 -> 'minute', 86400 -> 'day', else '<n> s'."""
    return {60.0: "minute", 86400.0: "day"}.get(float(seconds), f"{seconds:g} s")
