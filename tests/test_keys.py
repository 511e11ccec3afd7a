"""Key store: secrets shown once and stored hashed, revoke, rotate with overlap, expiry, patterns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hearth.store.db import MIGRATIONS, open_database
from hearth.store.keys import KeyError_, KeyStore, hash_secret, parse_duration, parse_when


class Clock:
    """A settable clock."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> KeyStore:
    return KeyStore(open_database(tmp_path / "hearth.db"), clock)


def test_secret_is_shown_once_and_only_its_hash_is_stored(store: KeyStore, tmp_path: Path) -> None:
    key, secret = store.create("paperless", role="service")
    assert secret.startswith("hk-") and len(secret) == 3 + 43  # 32 random bytes, base64url
    assert store.verify(secret) is not None and store.verify(secret).name == "paperless"
    store.db.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("hearth.db*"))
    assert secret.encode() not in raw
    assert hash_secret(secret).encode() in raw
    assert key.prefixes == [secret[:11]]


def test_secrets_are_unique_and_wrong_ones_fail(store: KeyStore) -> None:
    _, a = store.create("a")
    _, b = store.create("b")
    assert a != b
    assert store.verify(a[:-1] + ("A" if a[-1] != "A" else "B")) is None
    assert store.verify("hk-short") is None
    assert store.verify("sk-" + a[3:]) is None


def test_revoke_is_immediate_and_name_can_be_reused(store: KeyStore) -> None:
    _, secret = store.create("voice")
    store.revoke("voice")
    assert store.verify(secret) is None
    assert [k.name for k in store.list()] == []
    assert [k.name for k in store.list(include_revoked=True)] == ["voice"]
    _, again = store.create("voice")
    assert store.verify(again) is not None and store.verify(secret) is None
    assert store.any_keys()


def test_rotate_with_overlap_then_only_new(store: KeyStore, clock: Clock) -> None:
    _, old = store.create("chat")
    key, new = store.rotate("chat", overlap=3600)
    assert len(key.prefixes) == 2
    assert store.verify(old) is not None and store.verify(new) is not None
    clock.t += 3601
    assert store.verify(old) is None
    assert store.verify(new) is not None
    assert store.get("chat").prefixes == [new[:11]]


def test_rotate_without_overlap_stops_old_at_once(store: KeyStore) -> None:
    _, old = store.create("chat")
    _, new = store.rotate("chat")
    assert store.verify(old) is None and store.verify(new) is not None


def test_expiry(store: KeyStore, clock: Clock) -> None:
    _, secret = store.create("temp", expires_at=clock.t + 60)
    assert store.verify(secret) is not None
    clock.t += 61
    assert store.verify(secret) is None


def test_admin_detection_ignores_revoked_and_expired(store: KeyStore, clock: Clock) -> None:
    assert not store.any_keys() and not store.has_admin()
    store.create("u", role="user")
    assert store.any_keys() and not store.has_admin()
    store.create("boss", role="admin", expires_at=clock.t + 10)
    assert store.has_admin()
    clock.t += 11
    assert not store.has_admin()


def test_model_patterns(store: KeyStore) -> None:
    key, _ = store.create("ha", models=["gemma3*", "qwen*:7b"])
    assert key.allows_model(["gemma3-270m:latest"])
    assert key.allows_model(["qwen2.5:7b"])
    assert not key.allows_model(["llama3:8b", "llama3"])
    assert store.create("all")[0].allows_model(["anything"])


@pytest.mark.parametrize("name,role,rpm,fix", [
    ("has space", "user", None, "letters"),
    ("ok", "root", None, "role must be one of"),
    ("ok", "user", 0, "--rpm must be 1 or more"),
    ("ok", "user", 2**63, "--rpm must be at most"),  # more than SQLite's integers hold: was a 500
])
def test_bad_keys_say_what_to_fix(store: KeyStore, name: str, role: str, rpm: int | None, fix: str) -> None:
    with pytest.raises(KeyError_, match=fix):
        store.create(name, role=role, rpm=rpm)


def test_duplicate_and_missing_names(store: KeyStore) -> None:
    store.create("dup")
    with pytest.raises(KeyError_, match="already exists"):
        store.create("dup")
    with pytest.raises(KeyError_, match="no key named 'nope'"):
        store.revoke("nope")


def test_durations_and_dates() -> None:
    assert parse_duration("24h") == 86400 and parse_duration("90s") == 90 and parse_duration("15") == 15
    assert parse_when("2d", lambda: 100.0) == 100 + 2 * 86400
    assert parse_when("1h", lambda: 10000.0, future=False) == 10000 - 3600
    assert parse_when("2030-01-01T00:00+00:00") == 1893456000
    with pytest.raises(KeyError_, match="not understood"):
        parse_when("next tuesday")


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    db = open_database(tmp_path / "x.db")
    db.close()
    db = open_database(tmp_path / "x.db")
    assert db.query("PRAGMA user_version")[0][0] == len(MIGRATIONS)
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"


class CountingDatabase:
    """The real database, counting the queries that reach it."""

    def __init__(self, path: Path) -> None:
        self.inner = open_database(path)
        self.path = self.inner.path
        self.queries = 0

    def query(self, sql: str, params: tuple = ()) -> list:
        self.queries += 1
        return self.inner.query(sql, params)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_changes_from_another_process_count_on_the_next_request(tmp_path: Path, clock: Clock) -> None:
    server = KeyStore(open_database(tmp_path / "hearth.db"), clock)
    cli = KeyStore(open_database(tmp_path / "hearth.db"), clock)  # its own connection, like `hearth keys`
    assert not server.any_keys()
    key, secret = cli.create("phone")
    assert server.any_keys()
    assert server.verify(secret).name == "phone"
    cli.revoke("phone")
    assert server.verify(secret) is None
    _, again = cli.create("phone")
    new, newer = cli.rotate("phone", overlap=0)
    assert server.verify(again) is None and server.verify(newer).name == "phone"


def test_checks_come_from_memory_until_the_keys_change(tmp_path: Path, clock: Clock) -> None:
    db = CountingDatabase(tmp_path / "hearth.db")
    server = KeyStore(db, clock)
    cli = KeyStore(open_database(tmp_path / "hearth.db"), clock)
    _, secret = cli.create("tv")
    server.any_keys(), server.verify(secret)
    before = db.queries
    for _ in range(5):
        assert server.any_keys() and server.verify(secret).name == "tv"
    assert db.queries == before  # one stat per check, no query
    assert server.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None  # a wrong secret is not cached
    assert db.queries == before + 1
    cli.create("radio")
    assert server.verify(secret).name == "tv"
    assert db.queries == before + 2  # the stamp changed: asked again


def test_changes_count_when_the_stamp_is_linked_elsewhere_too(tmp_path: Path, clock: Clock) -> None:
    """A backup tool's hard link keeps a replaced stamp alive: the server must still see the new one."""
    server = KeyStore(open_database(tmp_path / "hearth.db"), clock)
    cli = KeyStore(open_database(tmp_path / "hearth.db"), clock)
    _, secret = cli.create("phone")
    assert server.verify(secret).name == "phone"  # the server now holds the stamp file open
    assert server.stamp is not None
    os.link(server.stamp, tmp_path / "backup-of-stamp")
    cli.revoke("phone")  # replaces the stamp; the old file lives on under the backup's name
    assert server.verify(secret) is None
    _, again = cli.create("tablet")
    assert server.verify(again).name == "tablet"
    server.close()
    cli.close()


def test_an_expired_key_says_to_revoke_and_recreate(store: KeyStore, clock: Clock) -> None:
    store.create("a", expires_at=clock.t + 100)
    clock.t += 200
    with pytest.raises(KeyError_, match="expired on .*revoke it and create it again"):
        store.rotate("a")  # a new secret on the expired key would be dead on arrival
    with pytest.raises(KeyError_, match="expired on"):
        store.create("a")
    store.revoke("a")
    _, secret = store.create("a")
    assert store.verify(secret) is not None


def test_expiry_must_be_ahead_and_dates_out_of_range_are_refused(store: KeyStore, clock: Clock) -> None:
    with pytest.raises(KeyError_, match="not in the future"):
        store.create("late", expires_at=clock.t - 1)
    for text in ("0001-01-01", "0001-01-01T00:00"):
        with pytest.raises(KeyError_, match="out of range"):
            parse_when(text)
    with pytest.raises(KeyError_, match="more than 100 years"):
        parse_duration("4000000d")


def test_two_first_opens_at_once_migrate_once(tmp_path: Path) -> None:
    """`hearth serve` and `hearth keys create` on a new home: the second waits, then finds the schema."""
    import sqlite3
    import threading

    from hearth.store.db import migrate

    path = tmp_path / "race.db"
    holder = sqlite3.connect(str(path), isolation_level=None, timeout=10.0)
    holder.execute("BEGIN IMMEDIATE")  # the first opener, inside its migration
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            holder.execute(statement)
    holder.execute("PRAGMA user_version=1")
    other = sqlite3.connect(str(path), isolation_level=None, timeout=10.0, check_same_thread=False)
    done: list[BaseException | None] = []

    def second() -> None:
        try:
            migrate(other)
            done.append(None)
        except BaseException as exc:  # reported below
            done.append(exc)

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(0.3)
    holder.execute("COMMIT")
    thread.join(10)
    assert done == [None]
    assert other.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
