"""Model name -> engine. Names follow Ollama's `name:tag` (tag defaults to latest)."""

from __future__ import annotations

from hearth.core.engine import Engine
from hearth.core.errors import NotFound
from hearth.core.types import ModelInfo


def normalize(name: str) -> str:
    """`gemma3-270m` -> `gemma3-270m:latest`; names with a tag stay as they are."""
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


class Router:
    """Resolves public model names (ids and aliases) to an engine and a model."""

    def __init__(self, engines: list[Engine], default_model: str, aliases: dict[str, str]) -> None:
        self.engines = engines
        self.default_model = default_model
        self.aliases = dict(aliases)
        self._table: dict[str, tuple[Engine, ModelInfo]] = {}

    async def refresh(self) -> None:
        """Rebuild the name table from every engine's model list."""
        table: dict[str, tuple[Engine, ModelInfo]] = {}
        for engine in self.engines:
            for info in await engine.list_models():
                table.setdefault(info.id, (engine, info))
        for alias, target in self.aliases.items():
            hit = self._lookup(table, target)
            if hit is not None:
                hit[1].aliases = sorted(set(hit[1].aliases) | {alias})
        self._table = table

    @staticmethod
    def _lookup(table: dict[str, tuple[Engine, ModelInfo]], name: str) -> tuple[Engine, ModelInfo] | None:
        for key in (name, normalize(name), name.removesuffix(":latest")):
            if key in table:
                return table[key]
        return None

    async def models(self) -> list[ModelInfo]:
        """All served models (aliases are listed on their targets)."""
        if not self._table:
            await self.refresh()
        return [info for _, info in self._table.values()]

    async def resolve(self, name: str | None) -> tuple[Engine, ModelInfo]:
        """Find the engine for `name` (None or "" = the default model)."""
        if not self._table:
            await self.refresh()
        wanted = name or self.default_model
        target = self.aliases.get(wanted) or self.aliases.get(normalize(wanted).removesuffix(":latest"))
        hit = self._lookup(self._table, target or wanted)
        if hit is None:
            await self.refresh()
            hit = self._lookup(self._table, target or wanted)
        if hit is None:
            names = sorted(self._table) + sorted(self.aliases)
            raise NotFound(
                f"model {wanted!r} does not exist; available: {', '.join(names) or 'none'}",
                param="model",
            )
        return hit
