"""Usage: one row per request (counts and timings, never prompts or answers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hearth.store.db import Database

GROUPS = {
    "key": "COALESCE(key_name, '(no key)')",
    "model": "COALESCE(model, '(none)')",
    "day": "date(ts, 'unixepoch', 'localtime')",
}


@dataclass(slots=True)
class UsageRow:
    """What is stored about one request."""

    ts: float
    key_id: int | None
    key_name: str | None
    model: str | None
    engine: str | None
    cloud: bool
    dialect: str
    route: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_ms: float | None
    duration_ms: float


INSERT_SQL = (
    "INSERT INTO usage (ts, key_id, key_name, model, engine, cloud, dialect, route, status, prompt_tokens, "
    "completion_tokens, cached_tokens, ttft_ms, duration_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def row_values(row: UsageRow) -> tuple[Any, ...]:
    """The row's values in `INSERT_SQL` order."""
    return (row.ts, row.key_id, row.key_name, row.model, row.engine, int(row.cloud), row.dialect, row.route,
            row.status, row.prompt_tokens, row.completion_tokens, row.cached_tokens, row.ttft_ms, row.duration_ms)


class UsageStore:
    """Writes and summarises usage rows."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, row: UsageRow) -> None:
        """Store one request (committed by the caller's transaction, or at once)."""
        self.db.execute(INSERT_SQL, row_values(row))

    def summary(self, by: str = "key", since: float | None = None) -> list[dict[str, Any]]:
        """Totals grouped by key, model or day, largest first (days: newest first)."""
        if by not in GROUPS:
            raise ValueError(f"--by must be one of {', '.join(GROUPS)}, got {by!r}")
        group = GROUPS[by]
        rows = self.db.query(
            f"SELECT {group} AS g, COUNT(*), SUM(status >= 400), SUM(prompt_tokens), SUM(completion_tokens), "
            "SUM(cached_tokens), AVG(ttft_ms), AVG(duration_ms), MAX(ts) FROM usage WHERE ts >= ? "
            f"GROUP BY g ORDER BY {'g DESC' if by == 'day' else 'COUNT(*) DESC, g'}",
            (since or 0.0,),
        )
        return [
            {by: r[0], "requests": r[1], "errors": r[2] or 0, "prompt_tokens": r[3] or 0,
             "completion_tokens": r[4] or 0, "cached_tokens": r[5] or 0,
             "avg_ttft_ms": round(r[6], 1) if r[6] is not None else None,
             "avg_duration_ms": round(r[7], 1) if r[7] is not None else None, "last": r[8]}
            for r in rows
        ]

    def recent(self, since: float) -> list[tuple[int, float, int]]:
        """(key_id, ts, tokens) of admitted keyed requests since `since` (to restore quota counters)."""
        rows = self.db.query(
            "SELECT key_id, ts, prompt_tokens + completion_tokens FROM usage WHERE ts >= ? AND key_id IS NOT NULL "
            "AND status != 429 ORDER BY ts", (since,))
        return [(r[0], r[1], r[2]) for r in rows]

    def cloud_calls(self, since: float | None = None) -> list[dict[str, Any]]:
        """Requests that went to a cloud upstream, grouped by key and engine."""
        rows = self.db.query(
            "SELECT COALESCE(key_name, '(no key)'), engine, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
            "MIN(ts), MAX(ts) FROM usage WHERE cloud = 1 AND ts >= ? GROUP BY 1, 2 ORDER BY 3 DESC",
            (since or 0.0,))
        return [{"key": r[0], "engine": r[1], "requests": r[2], "prompt_tokens": r[3] or 0,
                 "completion_tokens": r[4] or 0, "first": r[5], "last": r[6]} for r in rows]
