"""One model in the store: a small JSON manifest next to a content-addressed blob.

Layout under `settings.models_dir`:

    blobs/sha256-<hex>                 the GGUF bytes (shared by copies)
    manifests/<name>/<tag>.json        one manifest per name:tag

A name may contain slashes (`hf.co/owner/repo`), each becoming a folder.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hearth.core.errors import BadRequest
from hearth.models.gguf_meta import GGUFInfo

NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def split_name(name: str) -> tuple[str, str]:
    """`llama3.1:8b` -> ("llama3.1", "8b"); no tag -> "latest". Rejects unsafe names."""
    name = name.strip()
    base, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        base, tag = name, "latest"
    parts = base.split("/")
    if not base or any(not NAME_PART.match(p) or p in {".", ".."} for p in parts) or not TAG.match(tag):
        raise BadRequest(
            f"model name {name!r} is not valid; use letters, digits, '.', '-', '_' and '/' "
            "with an optional ':tag' (e.g. `mymodel:q4`)", param="model")
    return base, tag


def full_name(name: str) -> str:
    """The canonical `name:tag` form."""
    base, tag = split_name(name)
    return f"{base}:{tag}"


@dataclass(slots=True)
class Manifest:
    """What hearth records about a model it holds."""

    name: str  # canonical name:tag
    sha256: str
    size: int
    source: str = ""
    format: str = "gguf"
    architecture: str = ""
    parameter_count: int = 0
    size_label: str = ""
    quantization: str = ""
    context_length: int = 0
    embedding_length: int = 0
    block_count: int = 0
    has_chat_template: bool = False
    pulled_at: float = field(default_factory=time.time)
    roles: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        """Ollama-style digest: `sha256:<hex>`."""
        return f"sha256:{self.sha256}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_gguf(cls, name: str, info: GGUFInfo, sha256: str, size: int, source: str,
                  roles: Iterable[str] | None = None) -> Manifest:
        """Build a manifest from a GGUF's header (never its weights)."""
        return cls(
            name=full_name(name), sha256=sha256, size=size, source=source,
            architecture=info.architecture, parameter_count=info.parameter_count,
            size_label=info.size_label, quantization=info.quantization,
            context_length=info.context_length, embedding_length=info.embedding_length,
            block_count=int(info.arch("block_count", 0) or 0),
            has_chat_template=info.chat_template is not None, roles=list(roles or []),
        )
