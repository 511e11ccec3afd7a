"""The usage journal: one append per request, folded into the database in batches.

A usage row must survive a SIGKILL that comes right after the response's last
byte. A SQLite commit per request gives that but costs about 100 µs on the
request path. A line copied into a shared memory map of the journal file is
just as safe against a killed process (it is in the OS page cache, as a WAL
commit or a `write` would be) and costs no system call: the file is made
`CAPACITY` bytes long up front (sparse), rows are lines of JSON, and the
first NUL byte ends them. A full file is sealed at once and a fresh one
mapped.

The server owns the journal (an flock on `<journal>.lock`) and a thread of its
own folds it into the `usage` table every `interval` seconds: the file is
renamed to `<journal>.<gen>` (a fresh file takes new appends), its rows and
`gen` (in `usage_folds`) are committed in one transaction, then the file is
deleted. A crash at any point leaves a sealed file whose gen is recorded
(deleted unread) or not (folded again): no row is lost or counted twice.

Whoever opens the database (`settle`) folds what a dead owner left behind,
or, while a live server owns the journal, waits until the rows appended
before it looked have been folded (one interval or so).
"""

from __future__ import annotations

import logging
import mmap
import os
import sqlite3
import threading
import time
from pathlib import Path

import orjson

from hearth.store.db import connect
from hearth.store.locks import try_lock
from hearth.store.usage import INSERT_SQL, UsageRow, row_values

log = logging.getLogger("hearth.store")
SETTLE_TIMEOUT = 5.0
CAPACITY = 1 << 20  # bytes of the mapped active file: about 8,000 rows between folds


def journal_path(db_path: Path) -> Path:
    """Where the journal of a database file lives (beside it)."""
    return db_path.with_name(db_path.name + "-usage.journal")


def _sealed(journal: Path) -> list[tuple[int, Path]]:
    """Sealed journal files, oldest first."""
    out = []
    for p in journal.parent.glob(journal.name + ".*"):
        suffix = p.name[len(journal.name) + 1:]
        if suffix.isdigit():
            out.append((int(suffix), p))
    return sorted(out)


def _has_rows(journal: Path) -> bool:
    """True if the active journal holds a row (it is mapped at full size: look at its first byte)."""
    try:
        with journal.open("rb") as f:
            return f.read(1) not in (b"", b"\0")
    except FileNotFoundError:
        return False


def _seal(journal: Path) -> Path | None:
    """Rename the active journal to a sealed file (None if there is nothing in it)."""
    if not _has_rows(journal):
        return None
    sealed = journal.with_name(f"{journal.name}.{time.time_ns()}")
    os.rename(journal, sealed)
    return sealed


def _parse(data: bytes, source: Path) -> list[tuple[object, ...]]:
    end = data.find(b"\0")  # the unwritten rest of a mapped file (JSON lines hold no raw NUL)
    if end >= 0:
        data = data[:end]
    rows = []
    for n, line in enumerate(data.split(b"\n"), start=1):
        if not line:
            continue
        try:
            values = orjson.loads(line)
        except orjson.JSONDecodeError:
            # only a write cut off by a crash can leave half a line
            log.warning("usage journal %s: line %d is unreadable, skipped", source.name, n)
            continue
        if isinstance(values, list) and len(values) == 14:
            rows.append(tuple(values))
    return rows


def fold_sealed(conn: sqlite3.Connection, journal: Path) -> int:
    """Commit every sealed journal file into `usage`, then delete it; returns rows added."""
    added = 0
    for gen, path in _sealed(journal):
        rows = _parse(path.read_bytes(), path)
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = conn.execute("SELECT 1 FROM usage_folds WHERE gen = ?", (gen,)).fetchone()
            if not done:
                conn.executemany(INSERT_SQL, rows)
                conn.execute("INSERT INTO usage_folds (gen) VALUES (?)", (gen,))
                added += len(rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        path.unlink()
        conn.execute("DELETE FROM usage_folds WHERE gen < ?", (gen,))  # the newest stays, for `settle`
    return added


def _try_lock(journal: Path) -> int | None:
    """The fd of the journal's lock, held; None if another process holds it."""
    return try_lock(journal.with_name(journal.name + ".lock"))


def _pending(journal: Path) -> bool:
    """True while rows wait in the journal (active or sealed files)."""
    return _has_rows(journal) or bool(_sealed(journal))


def settle(conn: sqlite3.Connection, db_path: Path, timeout: float = SETTLE_TIMEOUT) -> None:
    """Make `usage` hold every row appended so far (see the module docstring)."""
    journal = journal_path(db_path)
    if not _pending(journal):
        return
    fd = _try_lock(journal)
    if fd is not None:  # no live owner: fold what it left
        try:
            _seal(journal)
            fold_sealed(conn, journal)
        finally:
            os.close(fd)
        return
    # A live server seals the active file (gen = the time then) and folds it
    # within its interval; `usage_folds` keeps the newest folded gen.
    since = time.time_ns()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pending(journal):
        newest = conn.execute("SELECT MAX(gen) FROM usage_folds").fetchone()[0]
        if newest is not None and newest >= since:
            return
        time.sleep(0.02)
    if _pending(journal):
        log.warning("usage rows of the last seconds are still in %s (the server has not folded them yet)", journal)


class UsageJournal:
    """The server's side: appends on the request path, folds on a thread."""

    def __init__(self, db_path: Path, lock_fd: int, interval: float = 0.25, capacity: int = CAPACITY) -> None:
        self.db_path = db_path
        self.capacity = capacity
        self.path = journal_path(db_path)
        self.interval = interval
        self._lock_fd = lock_fd
        self._write = threading.Lock()  # appends vs. the swap to a fresh file
        self._fold = threading.Lock()  # one fold at a time (thread, admin reads, close)
        _seal(self.path)  # what a killed owner left goes to the first fold; appends start a fresh file
        self._fd, self._map = self._fresh()
        self._size = 0  # bytes of rows in the map
        self._conn = connect(db_path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hearth-usage-journal", daemon=True)
        self._thread.start()

    @classmethod
    def claim(cls, db_path: Path, interval: float = 0.25) -> UsageJournal | None:
        """Own the journal of `db_path`; None if another live process owns it, or if its file system
        cannot map it (then every row is committed on its own: slower, as safe)."""
        fd = _try_lock(journal_path(db_path))
        if fd is None:
            return None
        try:
            return cls(db_path, fd, interval)
        except (OSError, ValueError) as exc:  # e.g. a FUSE mount without shared writable maps
            os.close(fd)
            log.warning("usage journal %s cannot be mapped (%s); recording each request in the database instead",
                        journal_path(db_path), exc)
            return None

    def _fresh(self) -> tuple[int, mmap.mmap]:
        """A new active file, `CAPACITY` bytes of zeros (sparse), mapped for writing."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, self.capacity)
            return fd, mmap.mmap(fd, self.capacity)
        except BaseException:
            os.close(fd)
            raise

    def append(self, row: UsageRow) -> None:
        """Record one request: a copy into the map, durable against a killed process when it returns."""
        line = orjson.dumps(row_values(row)) + b"\n"
        with self._write:
            start = self._size
            end = start + len(line)
            if end > self.capacity:  # full before a fold came: seal it now
                if start:
                    self._swap()
                start, end = 0, len(line)
                if end > self.capacity:
                    raise ValueError(f"a usage row of {end} bytes does not fit the journal ({self.capacity})")
            self._map[start:end] = line
            self._size = end

    def _swap(self) -> None:
        """Seal the active file (cut to its rows) and map a fresh one; call with `_write` held."""
        self._map.close()
        os.ftruncate(self._fd, self._size)
        os.close(self._fd)
        _seal(self.path)
        self._fd, self._map = self._fresh()
        self._size = 0

    def fold(self) -> int:
        """Move everything appended so far into the database; returns rows added."""
        with self._fold:
            with self._write:
                if self._size:
                    self._swap()
            return fold_sealed(self._conn, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.fold()
            except (OSError, sqlite3.Error) as exc:  # the rows stay in the files; the next round retries
                log.warning("usage journal fold failed: %s", exc)

    def close(self) -> None:
        """Stop the thread, fold the rest, let go of the journal."""
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.fold()
        finally:
            self._map.close()
            os.close(self._fd)
            if not self._size:  # folded to the end: no empty file left behind
                self.path.unlink(missing_ok=True)
            self._conn.close()
            os.close(self._lock_fd)
