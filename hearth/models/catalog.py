"""The shipped catalog (catalog.toml): recommended models by role and hardware tier."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hearth.core.errors import BadRequest, NotFound
from hearth.models.fit import Shape, Verdict, check
from hearth.models.hardware import Hardware
from hearth.models.manifest import full_name

ROLES = ("chat", "code", "embed", "fast")


@dataclass(slots=True)
class CatalogEntry:
    """One recommended model."""

    name: str
    source: str
    roles: list[str]
    tier: str
    size: int
    shape: Shape
    rank: int = 0
    sha256: str = ""
    ram: int = 0
    description: str = ""
    embedding_dimensions: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CatalogEntry:
        shape = Shape.from_dict({**data["shape"], "weights_bytes": data["size"]})
        rest = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "shape"}
        rest["name"] = full_name(rest["name"])
        return cls(shape=shape, **rest)

    def fit(self, hw: Hardware, ctx: int = 4096, parallel: int = 1) -> Verdict:
        return check(self.shape, hw, ctx, parallel)


def load(path: Path | None = None) -> list[CatalogEntry]:
    """The catalog shipped with hearth (or another TOML file with the same layout)."""
    if path is None:
        text = resources.files("hearth.models").joinpath("catalog.toml").read_text()
    else:
        text = Path(path).read_text()
    return [CatalogEntry.from_dict(m) for m in tomllib.loads(text).get("model", [])]


def find(name: str, entries: list[CatalogEntry] | None = None) -> CatalogEntry | None:
    """The catalog entry named `name` (tag defaults to latest), if any."""
    try:
        wanted = full_name(name)
    except BadRequest:  # a source string such as a URL is not a catalog name
        return None
    return next((e for e in (entries or load()) if e.name == wanted), None)


def pick(role: str, hw: Hardware, ctx: int = 4096, parallel: int = 1,
         entries: list[CatalogEntry] | None = None) -> tuple[CatalogEntry, Verdict]:
    """The best-ranked catalog model for `role` that fits this machine."""
    if role not in ROLES:
        raise NotFound(f"unknown role {role!r}; roles are {', '.join(ROLES)}", code="unknown_role")
    candidates = sorted((e for e in (entries or load()) if role in e.roles),
                        key=lambda e: (e.rank, e.size), reverse=True)
    for entry in candidates:
        verdict = entry.fit(hw, ctx, parallel)
        if verdict.fits:
            return entry, verdict
    raise NotFound(f"no catalog model for role {role!r} fits this machine at ctx {ctx} x {parallel}; "
                   "try a shorter --ctx or fewer --parallel slots", code="nothing_fits")
