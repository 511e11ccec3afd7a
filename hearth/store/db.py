"""The database behind keys and usage: SQLite by default, one small interface.

Everything else in `hearth.store` talks to a `Database` through four calls:
`execute` (one write, committed), `query` (rows as tuples), `transaction`
(several writes committed together) and `close`. SQL uses `?` placeholders
and only portable statements, so a PostgreSQL backend can be added later
behind the same interface (translating `?` to `%s`).

Durability: the SQLite file runs in WAL mode with `synchronous=NORMAL`. A
committed transaction is in the WAL file (the OS page cache) before
`execute` returns, so killing hearth with SIGKILL right after loses nothing;
only a power cut can lose the last commits (set `HEARTH_DB_SYNC=full` to
fsync every commit, at a cost of milliseconds per request).

Usage rows of a running server go through an append-only journal first
(`usage_journal.py`); opening the database folds or waits for them.

Migrations are an ordered list; `PRAGMA user_version` says how many ran.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("hearth.store")

MIGRATIONS: tuple[str, ...] = (
    # 1: keys and their secrets (several secrets per key during a rotation overlap)
    """
    CREATE TABLE keys (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        models TEXT NOT NULL DEFAULT '["*"]',
        allow_cloud INTEGER NOT NULL DEFAULT 0,
        rpm INTEGER,
        tokens_per_day INTEGER,
        created_at REAL NOT NULL,
        expires_at REAL,
        revoked_at REAL,
        last_used_at REAL
    );
    CREATE UNIQUE INDEX keys_live_name ON keys(name) WHERE revoked_at IS NULL;
    CREATE TABLE key_secrets (
        id INTEGER PRIMARY KEY,
        key_id INTEGER NOT NULL REFERENCES keys(id),
        prefix TEXT NOT NULL,
        hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL
    );
    CREATE INDEX key_secrets_prefix ON key_secrets(prefix);
    """,
    # 2: usage, one row per request (counts and timings, never content)
    """
    CREATE TABLE usage (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        key_id INTEGER,
        key_name TEXT,
        model TEXT,
        engine TEXT,
        cloud INTEGER NOT NULL DEFAULT 0,
        dialect TEXT NOT NULL,
        route TEXT NOT NULL,
        status INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        ttft_ms REAL,
        duration_ms REAL NOT NULL
    );
    CREATE INDEX usage_ts ON usage(ts);
    CREATE INDEX usage_key_ts ON usage(key_id, ts);
    """,
    # 3: the newest usage-journal file folded into `usage` (see usage_journal.py)
    """
    CREATE TABLE usage_folds (gen INTEGER PRIMARY KEY);
    """,
)


class Database(Protocol):
    """What the stores need from a database (SQLite now, PostgreSQL later)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write and commit it; returns the new row id (inserts) or 0."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read; returns every row."""

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """Several writes committed together (or none, on an exception)."""

    def close(self) -> None:
        """Release the connection."""


def connect(path: Path | str, sync: str | None = None) -> sqlite3.Connection:
    """A connection in autocommit mode with hearth's settings (WAL, `HEARTH_DB_SYNC`, foreign keys)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    mode = (sync or os.environ.get("HEARTH_DB_SYNC") or "normal").upper()
    if mode not in ("NORMAL", "FULL"):
        conn.close()
        raise ValueError(f"HEARTH_DB_SYNC must be normal or full, got {mode.lower()!r}")
    conn.execute(f"PRAGMA synchronous={mode}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class SQLiteDatabase:
    """A `Database` on one SQLite file (one connection, used from one thread)."""

    def __init__(self, path: Path | str, sync: str | None = None, background_checkpoints: bool = False) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = connect(path, sync)
        self._depth = 0
        migrate(self.conn)
        if str(path) != ":memory:":
            from hearth.store.usage_journal import settle

            settle(self.conn, self.path)  # rows a server appended but has not folded yet
        self._checkpointer: Checkpointer | None = None
        if background_checkpoints and str(path) != ":memory:":
            # Copying the WAL into the database file takes milliseconds every
            # thousand pages; on a thread of its own no request waits for it.
            self.conn.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = Checkpointer(self.path)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cur = self.conn.execute(sql, params)
        return cur.lastrowid or 0

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SQLiteDatabase]:
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._depth = 0

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        self.conn.close()


class Checkpointer:
    """Runs `PRAGMA wal_checkpoint(PASSIVE)` every `interval` seconds on its own connection and thread."""

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hearth-db-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = connect(self.path)
        try:
            while not self._stop.wait(self.interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # busy or I/O trouble: the next round tries again
                    log.warning("database checkpoint failed: %s", exc)
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the thread (one last checkpoint is not needed: the WAL is part of the database)."""
        self._stop.set()
        self._thread.join(timeout=5)


def migrate(conn: sqlite3.Connection) -> None:
    """Run the migrations this database has not seen yet, in order."""
    while True:
        # the version is read inside the write lock: two processes opening a new home at once
        # (`hearth serve` and `hearth keys create`) must not both run the first migration
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"the database was written by a newer hearth (schema {version}, this one knows "
                    f"{len(MIGRATIONS)}); upgrade hearth")
            if version == len(MIGRATIONS):
                conn.execute("COMMIT")
                return
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def open_database(path: Path | str, background_checkpoints: bool = False) -> SQLiteDatabase:
    """Open (creating and migrating if needed) the database at `path`.

    The server passes `background_checkpoints`: WAL checkpoints then run on a
    thread instead of inside whichever commit crosses the threshold.
    """
    return SQLiteDatabase(path, background_checkpoints=background_checkpoints)


def now() -> float:
    """Wall-clock seconds (the stores' default clock)."""
    return time.time()
