"""API keys: create (secret shown once), list, revoke, rotate with overlap, verify.

A secret is `hk-` plus 43 URL-safe base64 characters (256 random bits). Only
its SHA-256 is stored (a slow hash adds nothing for 256-bit random secrets)
with an 8-character prefix to find it; the hash is compared with
`secrets.compare_digest`. A key can hold several secrets while a rotation
overlaps: the old one gets an expiry, the new one none.

Every change to the keys (create, revoke, rotate; from the CLI or the admin
API) replaces a stamp file next to the database. A server checks the stamp
(one stat) on each request and keeps "are there keys" and the keys it
verified in memory until the stamp changes: a revoked key stops working on
the next request, without a database query per request.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hearth.store.db import Database, now

log = logging.getLogger("hearth.keys")

ROLES = ("admin", "user", "service")
SECRET_PREFIX = "hk-"
PREFIX_LEN = len(SECRET_PREFIX) + 8
MAX_DURATION = 100 * 366 * 86400.0
DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STAMP_SUFFIX = "-keys.stamp"
CACHE_MAX = 4096


class KeyError_(ValueError):
    """A key operation that cannot be done; the message says why and what to do."""


@dataclass(slots=True)
class Key:
    """A key's public facts (never its secret)."""

    id: int
    name: str
    role: str
    models: list[str] = field(default_factory=lambda: ["*"])
    allow_cloud: bool = False
    rpm: int | None = None
    tokens_per_day: int | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    prefixes: list[str] = field(default_factory=list)

    @property
    def unrestricted(self) -> bool:
        """True when the key may use every model."""
        return "*" in self.models

    def allows_model(self, names: list[str]) -> bool:
        """True when any of `names` (a model's spellings) matches a pattern."""
        return self.unrestricted or any(fnmatch.fnmatchcase(n, p) for p in self.models for n in names)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for `keys list --json` and the admin API."""
        return {
            "name": self.name, "role": self.role, "models": self.models, "allow_cloud": self.allow_cloud,
            "rpm": self.rpm, "tokens_per_day": self.tokens_per_day, "prefixes": self.prefixes,
            "created_at": self.created_at, "expires_at": self.expires_at, "revoked_at": self.revoked_at,
            "last_used_at": self.last_used_at,
        }


KEY_COLUMNS = ("id, name, role, models, allow_cloud, rpm, tokens_per_day, created_at, expires_at, "
               "revoked_at, last_used_at")


def _key(row: tuple[Any, ...]) -> Key:
    return Key(id=row[0], name=row[1], role=row[2], models=json.loads(row[3]), allow_cloud=bool(row[4]),
               rpm=row[5], tokens_per_day=row[6], created_at=row[7], expires_at=row[8], revoked_at=row[9],
               last_used_at=row[10])


def hash_secret(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A fresh secret: `hk-` + 256 random bits."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """Keys in the database. `clock` is injectable for tests."""

    def __init__(self, db: Database, clock: Callable[[], float] = now) -> None:
        self.db = db
        self.clock = clock
        path = getattr(db, "path", None)
        self.stamp = Path(f"{path}{STAMP_SUFFIX}") if path is not None and str(path) != ":memory:" else None
        self._stamp_str = str(self.stamp)
        self._stamp_fd = -1  # the stamp file, open: fstat per request instead of a path lookup
        self._seen: object = None  # stamp version the caches below belong to
        self._any: bool | None = None
        self._verified: dict[str, tuple[Key, float | None]] = {}  # secret hash -> key, secret expiry
        if self.stamp is not None and not self.stamp.exists():
            # A missing stamp costs a raised FileNotFoundError on every request's check.
            try:
                self._changed()
            except OSError as exc:  # a read-only directory: version() copes with no stamp
                log.debug("cannot create the keys stamp %s: %s", self.stamp, exc)

    def version(self) -> tuple[int, int, int] | None:
        """Differs after every change to the keys by any process; None when there is no stamp to go by."""
        if self.stamp is None:
            return None
        if self._stamp_fd >= 0:
            st = os.fstat(self._stamp_fd)
            # every change replaces the stamp, which leaves this file without a link: one link means it
            # is still the stamp (a file linked elsewhere too goes the path's way, every time)
            if st.st_nlink == 1:
                return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            os.close(self._stamp_fd)
            self._stamp_fd = -1
        try:
            st = os.stat(self._stamp_str)  # a str: no Path conversion per request
        except FileNotFoundError:
            return (0, 0, 0)
        if st.st_nlink == 1:
            try:  # replaced in between: the next look sees the newer file and a new version (safe)
                self._stamp_fd = os.open(self._stamp_str, os.O_RDONLY)
            except OSError:
                self._stamp_fd = -1
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    def close(self) -> None:
        """Let go of the stamp file."""
        if self._stamp_fd >= 0:
            os.close(self._stamp_fd)
            self._stamp_fd = -1

    def _changed(self) -> None:
        """Replace the stamp (a new file each time, so its inode and times change)."""
        if self.stamp is None:
            return
        tmp = self.stamp.with_name(f"{self.stamp.name}.{os.getpid()}.tmp")
        tmp.write_text(str(time.time_ns()))
        os.replace(tmp, self.stamp)

    def _fresh(self) -> bool:
        """True if the caches are still valid; otherwise empties them."""
        v = self.version()
        if v is not None and v == self._seen:
            return True
        self._seen = v
        self._any = None
        self._verified.clear()
        return False

    def create(self, name: str, role: str = "user", models: list[str] | None = None, allow_cloud: bool = False,
               rpm: int | None = None, tokens_per_day: int | None = None,
               expires_at: float | None = None) -> tuple[Key, str]:
        """Create a key; returns it and its secret (the only time the secret exists in clear)."""
        check_new_key(name, role, rpm, tokens_per_day)
        t = self.clock()
        if expires_at is not None and expires_at <= t:
            raise KeyError_(f"the expiry {local_time(expires_at)} is not in the future; give a later date or a "
                            "duration like 30d")
        old = self.get(name)
        if old is not None:
            self._refuse_expired(old, t)
            raise KeyError_(f"a key named {name!r} already exists; pick another name or "
                            f"`hearth keys rotate {name}` for a new secret")
        secret = new_secret()
        with self.db.transaction():
            key_id = self.db.execute(
                "INSERT INTO keys (name, role, models, allow_cloud, rpm, tokens_per_day, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, role, json.dumps(models or ["*"]), int(allow_cloud), rpm, tokens_per_day, t, expires_at),
            )
            self._add_secret(key_id, secret, t)
        self._changed()
        key = self.get(name)
        assert key is not None
        return key, secret

    def _add_secret(self, key_id: int, secret: str, t: float) -> None:
        self.db.execute("INSERT INTO key_secrets (key_id, prefix, hash, created_at) VALUES (?, ?, ?, ?)",
                        (key_id, secret[:PREFIX_LEN], hash_secret(secret), t))

    def get(self, name: str) -> Key | None:
        """The live (not revoked) key called `name`."""
        rows = self.db.query(f"SELECT {KEY_COLUMNS} FROM keys WHERE name = ? AND revoked_at IS NULL", (name,))
        return self._with_prefixes(_key(rows[0])) if rows else None

    def _with_prefixes(self, key: Key) -> Key:
        t = self.clock()
        rows = self.db.query("SELECT prefix FROM key_secrets WHERE key_id = ? AND (expires_at IS NULL OR "
                             "expires_at > ?) ORDER BY id", (key.id, t))
        key.prefixes = [r[0] for r in rows]
        return key

    def list(self, include_revoked: bool = False) -> list[Key]:
        """Every key, oldest first (revoked ones only when asked)."""
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = self.db.query(f"SELECT {KEY_COLUMNS} FROM keys{where} ORDER BY id")
        return [self._with_prefixes(_key(r)) for r in rows]

    def revoke(self, name: str) -> Key:
        """Revoke a key: every secret of it stops working on the next request."""
        key = self._require(name)
        self.db.execute("UPDATE keys SET revoked_at = ? WHERE id = ?", (self.clock(), key.id))
        self._changed()
        key.revoked_at = self.clock()
        return key

    def rotate(self, name: str, overlap: float = 0.0) -> tuple[Key, str]:
        """Give a key a new secret; its current secrets keep working for `overlap` seconds."""
        if overlap < 0:
            raise KeyError_(f"overlap must be 0 or more seconds, got {overlap}")
        key = self._require(name)
        t = self.clock()
        self._refuse_expired(key, t)  # a new secret of an expired key would not work either
        secret = new_secret()
        with self.db.transaction():
            self.db.execute("UPDATE key_secrets SET expires_at = ? WHERE key_id = ? AND "
                            "(expires_at IS NULL OR expires_at > ?)", (t + overlap, key.id, t + overlap))
            self._add_secret(key.id, secret, t)
        self._changed()
        return self._with_prefixes(key), secret

    @staticmethod
    def _refuse_expired(key: Key, t: float) -> None:
        if key.expires_at is not None and key.expires_at <= t:
            raise KeyError_(f"key {key.name!r} expired on {local_time(key.expires_at)}; revoke it and create it "
                            f"again (`hearth keys revoke {key.name}`, then `hearth keys create {key.name} ...`)")

    def _require(self, name: str) -> Key:
        key = self.get(name)
        if key is None:
            raise KeyError_(f"no key named {name!r}; `hearth keys list` shows the keys that exist")
        return key

    def verify(self, secret: str) -> Key | None:
        """The key a presented secret belongs to, if it is valid now (else None)."""
        if not secret.startswith(SECRET_PREFIX) or len(secret) < PREFIX_LEN + 8:
            return None
        t = self.clock()
        digest = hash_secret(secret)
        if self._fresh() and digest in self._verified:
            key, cached_until = self._verified[digest]
            valid = (cached_until is None or cached_until > t) and (key.expires_at is None or key.expires_at > t)
            return key if valid else None
        rows = self.db.query(
            f"SELECT s.hash, s.expires_at, {', '.join('k.' + c.strip() for c in KEY_COLUMNS.split(','))} "
            "FROM key_secrets s JOIN keys k ON k.id = s.key_id WHERE s.prefix = ?", (secret[:PREFIX_LEN],))
        found: Key | None = None
        until: float | None = None
        for row in rows:
            if secrets.compare_digest(row[0], digest) and (row[1] is None or row[1] > t):
                found, until = _key(row[2:]), row[1]
        if found is None or found.revoked_at is not None or (found.expires_at is not None and found.expires_at <= t):
            return None
        if self._seen is not None and len(self._verified) < CACHE_MAX:  # only valid keys: no growth from guesses
            self._verified[digest] = (found, until)
        return found

    def touch(self, key_id: int, t: float) -> None:
        """Note that a key was used (part of the caller's transaction)."""
        self.db.execute("UPDATE keys SET last_used_at = ? WHERE id = ?", (t, key_id))

    def any_keys(self) -> bool:
        """True once any key has been created (revoked ones count: auth stays on)."""
        if self._fresh() and self._any is not None:
            return self._any
        self._any = bool(self.db.query("SELECT EXISTS (SELECT 1 FROM keys)")[0][0])
        return self._any

    def has_admin(self) -> bool:
        """True when a live, unexpired admin key exists."""
        rows = self.db.query("SELECT 1 FROM keys WHERE role = 'admin' AND revoked_at IS NULL AND "
                             "(expires_at IS NULL OR expires_at > ?) LIMIT 1", (self.clock(),))
        return bool(rows)


MAX_LIMIT = 10**12  # rpm or tokens per day


def check_new_key(name: str, role: str, rpm: int | None, tokens_per_day: int | None) -> None:
    """Refuse a key that cannot work, with the reason."""
    if not NAME_RE.match(name):
        raise KeyError_(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                        "letter or digit")
    if role not in ROLES:
        raise KeyError_(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    for label, value in (("rpm", rpm), ("tokens-per-day", tokens_per_day)):
        if value is not None and value < 1:
            raise KeyError_(f"--{label} must be 1 or more (leave it out for no limit), got {value}")
        if value is not None and value > MAX_LIMIT:  # SQLite holds 64-bit integers; no real limit is near this
            raise KeyError_(f"--{label} must be at most {MAX_LIMIT:,} (leave it out for no limit), got {value}")


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `24h`, `7d` or a number of seconds -> seconds."""
    m = DURATION_RE.fullmatch(text)
    if not m:
        raise KeyError_(f"duration {text!r} not understood; use e.g. 90s, 15m, 24h or 7d")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    seconds = float(m.group(1)) * scale
    if seconds > MAX_DURATION:
        raise KeyError_(f"duration {text!r} is more than 100 years; leave the expiry out for a key that "
                        "does not expire")
    return seconds


def parse_when(text: str, clock: Callable[[], float] = now, future: bool = True) -> float:
    """An ISO date/time (`2025-12-31`, `2025-12-31T18:00`) or a duration from now -> epoch seconds.

    `future=False` makes a duration count back from now (for `--since 7d`).
    """
    import datetime as dt

    if DURATION_RE.fullmatch(text):
        seconds = parse_duration(text)
        return clock() + seconds if future else clock() - seconds
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise KeyError_(f"time {text!r} not understood; use a date like 2025-12-31, a date and time like "
                        "2025-12-31T18:00, or a duration like 24h or 7d") from None
    try:
        if when.tzinfo is None:
            when = when.astimezone()  # local time, as a person typed it
        return when.timestamp()
    except (ValueError, OverflowError, OSError):  # year 1 and the like: out of the clock's range
        raise KeyError_(f"time {text!r} is out of range; use a date between 1971 and 9999") from None


def local_time(ts: float) -> str:
    """Epoch seconds as local `YYYY-MM-DD HH:MM` (for messages and tables)."""
    import datetime as dt

    try:
        return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
    except (ValueError, OverflowError, OSError):  # a far expiry set before durations were capped
        return "after 9999" if ts > 0 else "before 1970"
