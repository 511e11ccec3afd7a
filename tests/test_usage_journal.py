"""The usage journal: appends survive a killed owner, folds are exactly-once, readers see finished rows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from hearth.store.db import open_database
from hearth.store.usage import UsageRow
from hearth.store.usage_journal import UsageJournal, fold_sealed, journal_path


def row(i: int) -> UsageRow:
    return UsageRow(ts=1000.0 + i, key_id=None, key_name=f"k{i}", model="m", engine="e", cloud=False,
                    dialect="openai", route="/v1/chat/completions", status=200, prompt_tokens=i,
                    completion_tokens=1, cached_tokens=0, ttft_ms=1.0, duration_ms=2.0)


def count(db_path: Path) -> list[int]:
    db = open_database(db_path)
    try:
        return [r[0] for r in db.query("SELECT prompt_tokens FROM usage ORDER BY id")]
    finally:
        db.close()


def test_rows_of_a_killed_owner_are_folded_by_the_next_opener(tmp_path: Path) -> None:
    db_path = tmp_path / "hearth.db"
    open_database(db_path).close()
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from hearth.store.usage_journal import UsageJournal\n"
        "from tests.test_usage_journal import row\n"
        "j = UsageJournal.claim(Path(sys.argv[1]), interval=3600)\n"
        "for i in range(50):\n"
        "    j.append(row(i))\n"
        "os._exit(0)  # like SIGKILL: no close, no fold\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code, str(db_path), root], check=True, timeout=60)
    assert journal_path(db_path).stat().st_size > 0
    assert count(db_path) == list(range(50))
    assert not journal_path(db_path).exists() or journal_path(db_path).stat().st_size == 0
    assert count(db_path) == list(range(50))  # opened again: nothing counted twice


def test_a_live_owner_is_waited_for_and_a_second_owner_refused(tmp_path: Path) -> None:
    db_path = tmp_path / "hearth.db"
    open_database(db_path).close()
    owner = UsageJournal.claim(db_path, interval=0.2)
    assert owner is not None
    try:
        assert UsageJournal.claim(db_path) is None
        for i in range(10):
            owner.append(row(i))
        t0 = time.monotonic()
        assert count(db_path) == list(range(10))  # the opener waited for the owner's fold
        assert time.monotonic() - t0 < 3
        owner.append(row(10))
    finally:
        owner.close()
    assert count(db_path) == list(range(11))  # close folds the rest


def test_a_fold_cut_off_after_its_commit_is_not_repeated(tmp_path: Path) -> None:
    db_path = tmp_path / "hearth.db"
    db = open_database(db_path)
    journal = journal_path(db_path)
    data = orjson.dumps([1.0, None, None, "m", "e", 0, "openai", "/v1/x", 200, 7, 1, 0, None, 1.0]) + b"\n"
    sealed = journal.with_name(journal.name + ".123")
    sealed.write_bytes(data)
    assert fold_sealed(db.conn, journal) == 1
    sealed.write_bytes(data)  # as if the process died before deleting it
    assert fold_sealed(db.conn, journal) == 0
    assert not sealed.exists()
    db.close()
    assert count(db_path) == [7]


def test_half_a_line_from_a_crash_is_skipped_not_fatal(tmp_path: Path) -> None:
    db_path = tmp_path / "hearth.db"
    open_database(db_path).close()
    owner = UsageJournal.claim(db_path, interval=3600)
    assert owner is not None
    owner.append(row(1))
    owner.append(row(2))
    with journal_path(db_path).open("r+b") as f:  # a copy cut off by a kill: a line's start, then zeros
        f.seek(owner._size)
        f.write(b'[1.0, null, "cut')
    owner.close()
    assert count(db_path) == [1, 2]


def test_a_full_journal_is_sealed_at_once_and_nothing_is_lost(tmp_path: Path) -> None:
    db_path = tmp_path / "hearth.db"
    open_database(db_path).close()
    owner = UsageJournal(db_path, _lock(db_path), interval=3600, capacity=400)  # 4-5 rows of ~80 bytes per file
    for i in range(40):
        owner.append(row(i))
    assert len(list(tmp_path.glob("hearth.db-usage.journal.[0-9]*"))) >= 7  # sealed as they filled
    owner.close()
    assert count(db_path) == list(range(40))
    assert not journal_path(db_path).exists()  # folded to the end: no empty file left


def test_an_empty_mapped_journal_is_not_waited_for(tmp_path: Path) -> None:
    db_path = tmp_path / "hearth.db"
    open_database(db_path).close()
    owner = UsageJournal.claim(db_path, interval=3600)  # it never folds on its own here
    assert owner is not None
    try:
        assert journal_path(db_path).stat().st_size == owner.capacity  # mapped at full size, no rows
        t0 = time.monotonic()
        assert count(db_path) == []
        assert time.monotonic() - t0 < 1  # nothing pending: no wait for a fold
    finally:
        owner.close()


def _lock(db_path: Path) -> int:
    from hearth.store.usage_journal import _try_lock

    fd = _try_lock(journal_path(db_path))
    assert fd is not None
    return fd


def test_a_file_system_that_cannot_map_the_journal_falls_back_to_commits(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from hearth.store import usage_journal

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(19, "No such device")  # what a mount without shared writable maps says

    monkeypatch.setattr(usage_journal.mmap, "mmap", refuse)
    db_path = tmp_path / "hearth.db"
    open_database(db_path).close()
    assert UsageJournal.claim(db_path) is None
    fd = usage_journal._try_lock(journal_path(db_path))
    assert fd is not None  # the lock was let go
    os.close(fd)
