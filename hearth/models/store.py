"""The model store on disk: content-addressed GGUF blobs plus one manifest per name.

Blobs appear only by an atomic rename after their sha256 was checked, and a
manifest is written (atomically) only after its blob is in place, so an
interrupted or corrupt download never shows up as a model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from hearth.core.errors import BadRequest, HearthError, NotFound
from hearth.models.bundled import sha256_file
from hearth.models.gguf_meta import GGUFError, read_gguf
from hearth.models.manifest import Manifest, full_name, split_name


class ModelInUse(HearthError):
    """A model that is loaded or an alias target cannot be removed without force (409)."""

    status = 409
    type = "invalid_request_error"
    code = "model_in_use"


def atomic_write(path: Path, text: str) -> None:
    """Write a small text file by temp file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ModelStore:
    """Models under one directory (`settings.models_dir`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.partials = self.blobs / "partial"

    # -- paths ------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.blobs / f"sha256-{sha256}"

    def manifest_path(self, name: str) -> Path:
        base, tag = split_name(name)
        return self.manifests.joinpath(*base.split("/"), f"{tag}.json")

    # -- reading ----------------------------------------------------------------
    def list(self) -> list[Manifest]:
        """Every model whose manifest and blob are both present, by name."""
        found: list[Manifest] = []
        if not self.manifests.is_dir():
            return found
        for path in sorted(self.manifests.rglob("*.json")):
            if path.name.startswith("."):
                continue
            try:
                m = Manifest.read(path)
            except (OSError, ValueError, TypeError):
                continue  # a damaged manifest is not a model; `hearth models list` stays usable
            if self.blob_path(m.sha256).is_file():
                found.append(m)
        return sorted(found, key=lambda m: m.name)

    def get(self, name: str) -> Manifest:
        """The manifest for `name` (tag defaults to latest), or a 404 that lists what exists."""
        path = self.manifest_path(name)
        if path.is_file():
            m = Manifest.read(path)
            if self.blob_path(m.sha256).is_file():
                return m
        have = ", ".join(m.name for m in self.list()) or "none"
        raise NotFound(f"model {full_name(name)!r} is not in the store (have: {have}); "
                       "pull it with `hearth models pull NAME` or import a file", param="model")

    def has(self, name: str) -> bool:
        try:
            self.get(name)
        except (NotFound, BadRequest):  # BadRequest: not a model name at all (a path, a URL)
            return False
        return True

    def path(self, name: str) -> Path:
        return self.blob_path(self.get(name).sha256)

    # -- writing ----------------------------------------------------------------
    def save(self, manifest: Manifest) -> Manifest:
        """Write a manifest whose blob is already in place."""
        if not self.blob_path(manifest.sha256).is_file():
            raise NotFound(f"blob sha256:{manifest.sha256} is not in the store; pull the model again")
        path = self.manifest_path(manifest.name)
        try:
            replaced: str | None = Manifest.read(path).sha256
        except (OSError, ValueError, TypeError):
            replaced = None
        atomic_write(path, manifest.to_json())
        if replaced and replaced != manifest.sha256:
            self._prune_blob(replaced)  # a re-pull or a copy over the name: the old weights may be unused now
        return manifest

    def adopt(self, tmp: Path, sha256: str) -> Path:
        """Move a verified file into place as a blob (atomic rename)."""
        target = self.blob_path(sha256)
        self.blobs.mkdir(parents=True, exist_ok=True)
        if target.is_file():
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, target)
        return target

    def register(self, name: str, sha256: str, source: str, roles: Iterable[str] | None = None) -> Manifest:
        """Write a manifest for a blob already in the store, from its GGUF header."""
        blob = self.blob_path(sha256)
        try:
            info = read_gguf(blob)
        except GGUFError as exc:
            raise BadRequest(f"{exc}; only GGUF models can be stored") from None
        return self.save(Manifest.from_gguf(name, info, sha256, blob.stat().st_size, source, roles))

    def copy(self, src: str, dst: str) -> Manifest:
        """A new name for the same blob (no bytes copied)."""
        m = self.get(src)
        clone = Manifest.from_dict(_fields(m))
        clone.name = full_name(dst)
        return self.save(clone)

    def remove(self, name: str, *, loaded: Iterable[str] = (), aliases: dict[str, str] | None = None,
               force: bool = False) -> Manifest:
        """Delete a manifest (and its blob when no other name uses it)."""
        m = self.get(name)
        if not force:
            _refuse_if_used(m.name, set(loaded), aliases or {})
        self.manifest_path(m.name).unlink()
        self._prune_dirs(self.manifest_path(m.name).parent)
        self._prune_blob(m.sha256)
        return m

    def _prune_blob(self, sha256: str) -> None:
        """Delete a blob that no manifest uses any more."""
        if all(o.sha256 != sha256 for o in self.list()):
            self.blob_path(sha256).unlink(missing_ok=True)
            self.blob_path(sha256).with_name(f"sha256-{sha256}.verified").unlink(missing_ok=True)

    def _prune_dirs(self, folder: Path) -> None:
        while folder != self.manifests and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent

    def import_file(self, path: Path, name: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Manifest:
        """Register a local GGUF: hash it, hard-link (or copy) it in as a blob, write a manifest."""
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise NotFound(f"{path} does not exist; give the path of a .gguf file", code="file_not_found")
        try:
            read_gguf(path)
        except GGUFError as exc:
            raise BadRequest(f"{exc}; only GGUF files can be imported") from None
        sha = sha256_file(path)
        name = name or path.stem.lower().replace(" ", "-")
        full_name(name)  # validate before copying gigabytes
        if not self.blob_path(sha).is_file():
            self.partials.mkdir(parents=True, exist_ok=True)
            tmp = self.partials / f"import-{sha}.{os.getpid()}"
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            self.adopt(tmp, sha)
        return self.register(name, sha, f"file:{path}")


def _fields(m: Manifest) -> dict[str, object]:
    return {k: getattr(m, k) for k in m.__dataclass_fields__}


def _refuse_if_used(name: str, loaded: set[str], aliases: dict[str, str]) -> None:
    short = name.removesuffix(":latest")
    if name in loaded or short in loaded:
        raise ModelInUse(f"model {name!r} is loaded; unload it first or pass force "
                         "(`hearth models rm --force`)")
    users = sorted(a for a, t in aliases.items() if t in (name, short))
    if users:
        raise ModelInUse(f"model {name!r} is the target of alias {', '.join(users)}; change the alias "
                         "in hearth.toml first or pass force (`hearth models rm --force`)")
