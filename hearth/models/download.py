"""One verified, resumable HTTP download into a partial file.

The partial file lives in `blobs/partial/`; bytes already there are resumed
with an HTTP Range request (after a cut connection, within one call up to
`retries` times, or on the next pull). The caller renames it into place only
after the sha256 matched.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hearth.core.errors import HearthError, UpstreamError

Progress = Callable[[dict[str, Any]], None]
CHUNK = 256 * 1024
SPACE_MARGIN = 64 * 1024 * 1024


class InsufficientStorage(HearthError):
    """Not enough free disk space for the download (507)."""

    status = 507
    type = "server_error"
    code = "insufficient_storage"


class PullCancelled(HearthError):
    """The pull was cancelled; the partial file is kept for resuming (499)."""

    status = 499
    type = "invalid_request_error"
    code = "cancelled"


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem holding `path`."""
    return shutil.disk_usage(path).free


@dataclass
class Download:
    """Settings of one download."""

    url: str
    dest: Path
    digest_label: str  # shown in progress lines, e.g. sha256:abc...
    size: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    retries: int = 3
    free_space: Callable[[Path], int] = disk_free
    progress: Progress | None = None
    cancel: threading.Event | None = None
    timeout: float = 60.0


def hash_existing(path: Path) -> tuple[Any, int]:
    """sha256 state and length of the bytes already downloaded."""
    h = hashlib.sha256()
    n = 0
    if path.exists():
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
                n += len(block)
    return h, n


def fetch(dl: Download) -> str:
    """Download `dl.url` into `dl.dest` (resuming), returning the sha256 of the whole file."""
    dl.dest.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        try:
            return _attempt(dl)
        except (OSError, http.client.HTTPException, urllib.error.URLError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                have = dl.dest.stat().st_size if dl.dest.exists() else 0
                raise InsufficientStorage(f"the disk holding {dl.dest.parent} is full ({have} bytes of the download "
                                          "are kept); free some space or set `home` to a bigger disk, then pull "
                                          "again to resume") from None
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                raise UpstreamError(f"{dl.url} answered {exc.code}; check the name or your access") from None
            attempt += 1
            if attempt > dl.retries:
                have = dl.dest.stat().st_size if dl.dest.exists() else 0
                raise UpstreamError(f"download of {dl.url} failed after {attempt} tries ({exc}); "
                                    f"{have} bytes are kept: pull again to resume") from None
            time.sleep(min(0.2 * 2 ** attempt, 5.0))


def _attempt(dl: Download) -> str:
    h, have = hash_existing(dl.dest)
    if dl.size is not None and have > dl.size:
        dl.dest.unlink()
        h, have = hash_existing(dl.dest)
    if dl.size is not None and have == dl.size and dl.size > 0:
        return h.hexdigest()
    headers = {"User-Agent": "hearth", **dl.headers}
    validator = _validator_path(dl.dest)
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator.is_file():  # resume only onto the same version of the file
            headers["If-Range"] = validator.read_text()
    req = urllib.request.Request(dl.url, headers=headers)
    with urllib.request.urlopen(req, timeout=dl.timeout) as resp:
        if have and resp.status != 206:  # the server ignored Range, or the file changed: start over
            h, have = hashlib.sha256(), 0
            dl.dest.unlink(missing_ok=True)
        length = resp.headers.get("Content-Length")
        total = dl.size or (have + int(length) if length and length.isdigit() else None)
        _check_space(dl, total, have)
        if not have:
            _remember_version(validator, resp.headers)
        _stream(dl, resp, h, have, total)
    if total is not None and dl.dest.stat().st_size < total:
        raise http.client.IncompleteRead(b"", total - dl.dest.stat().st_size)
    return h.hexdigest()


def _validator_path(dest: Path) -> Path:
    return dest.with_name(f"{dest.name}.version")


def _remember_version(path: Path, headers: Any) -> None:
    """Keep the file's ETag (a strong one) or Last-Modified, for If-Range when resuming."""
    etag = headers.get("ETag") or ""
    value = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified") or ""
    if value:
        path.write_text(value)
    else:
        path.unlink(missing_ok=True)


def forget_version(dest: Path) -> None:
    """Drop what `fetch` remembered about a partial file (once it is adopted or deleted)."""
    _validator_path(dest).unlink(missing_ok=True)


def _check_space(dl: Download, total: int | None, have: int) -> None:
    if total is None:
        return
    need, free = total - have, dl.free_space(dl.dest.parent)
    if need + SPACE_MARGIN > free:
        raise InsufficientStorage(
            f"the download needs {need / 1e9:.2f} GB but {dl.dest.parent} has {free / 1e9:.2f} GB free; "
            "free some space or set `home` to a bigger disk")


def _stream(dl: Download, resp: Any, h: Any, have: int, total: int | None) -> None:
    done, last, t0, start = have, 0.0, time.monotonic(), have
    with dl.dest.open("ab") as out:
        while True:
            if dl.cancel is not None and dl.cancel.is_set():
                raise PullCancelled(f"pull cancelled; {done} bytes kept, pull again to resume")
            block = resp.read(CHUNK)
            if not block:
                break
            out.write(block)
            h.update(block)
            done += len(block)
            now = time.monotonic()
            if dl.progress and (now - last >= 0.1 or done == total):
                last = now
                dl.progress(_event(dl, done, total, (done - start) / max(now - t0, 1e-6)))
        out.flush()
    if dl.progress and done != total:  # the loop already reported a complete file
        dl.progress(_event(dl, done, total, (done - start) / max(time.monotonic() - t0, 1e-6)))


def _event(dl: Download, done: int, total: int | None, speed: float) -> dict[str, Any]:
    event: dict[str, Any] = {"status": f"pulling {dl.digest_label}", "digest": dl.digest_label,
                             "completed": done, "speed": int(speed)}
    if total is not None:
        event["total"] = total
    return event
