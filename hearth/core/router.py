"""Model name -> engine. Names follow Ollama's `name:tag` (tag defaults to latest)."""

from __future__ import annotations

import difflib
import logging

from hearth.core.engine import Engine
from hearth.core.errors import BadRequest, EngineUnavailable, NotFound
from hearth.core.types import EmbedRequest, ModelInfo

log = logging.getLogger("hearth.router")
Hit = tuple[Engine, ModelInfo]


class AliasError(BadRequest):
    """An alias that points nowhere or at a model that cannot satisfy it."""

    code = "alias_misconfigured"


def normalize(name: str) -> str:
    """`gemma3-270m` -> `gemma3-270m:latest`; names with a tag stay as they are."""
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


class Router:
    """Resolves public model names (ids and aliases) to an engine and a model.

    Every model is also reachable as `name@engine`; models whose id already
    carries `@engine` (cloud upstreams) are reachable only that way, so a cloud
    model can never stand in for a local one of the same name.
    """

    def __init__(
        self,
        engines: list[Engine],
        default_model: str,
        aliases: dict[str, str],
        dimensions: dict[str, int] | None = None,
    ) -> None:
        self.engines = engines
        self.default_model = default_model
        self.aliases = dict(aliases)
        self.dimensions = dict(dimensions or {})
        self._table: dict[str, Hit] = {}
        self._qualified: dict[str, Hit] = {}
        self._checked: set[str] = set()
        self._resolved: dict[str, tuple[str | None, Hit]] = {}  # name asked -> (alias, hit), per table

    async def refresh(self) -> None:
        """Rebuild the name table from every engine's model list."""
        table: dict[str, Hit] = {}
        qualified: dict[str, Hit] = {}
        for engine in self.engines:
            for info in await engine.list_models():
                table.setdefault(info.id, (engine, info))
                if "@" not in info.id:
                    qualified.setdefault(f"{info.id}@{engine.name}", (engine, info))
        self._table, self._qualified = table, qualified
        self._resolved = {}
        for alias, target in self.aliases.items():
            hit = self._find(target)
            if hit is not None:
                hit[1].aliases = sorted(set(hit[1].aliases) | {alias})

    def _find(self, name: str) -> Hit | None:
        model, at, engine = name.rpartition("@")
        if not at:
            return self._lookup(self._table, name)
        for key in (name, f"{normalize(model)}@{engine}", f"{model.removesuffix(':latest')}@{engine}"):
            hit = self._table.get(key) or self._qualified.get(key)
            if hit is not None:
                return hit
        return None

    @staticmethod
    def _lookup(table: dict[str, Hit], name: str) -> Hit | None:
        for key in (name, normalize(name), name.removesuffix(":latest")):
            if key in table:
                return table[key]
        return None

    async def models(self) -> list[ModelInfo]:
        """All served models (aliases are listed on their targets), as the engines know them now."""
        await self.refresh()  # engines list from memory; upstreams re-list in the background
        return [info for _, info in self._table.values()]

    def alias_target(self, name: str) -> str | None:
        """What `name` points to when it is an alias (any spelling of it); None otherwise."""
        alias = self._alias(name)
        return self.aliases[alias] if alias else None

    def _alias(self, wanted: str) -> str | None:
        for key in (wanted, normalize(wanted).removesuffix(":latest")):
            if key in self.aliases:
                return key
        return None

    async def resolve(self, name: str | None) -> Hit:
        """Find the engine for `name` (None or "" = the default model)."""
        if not self._table:
            await self.refresh()
        wanted = name or self.default_model
        known = self._resolved.get(wanted)  # the same name again: no spellings to try
        if known is not None:
            alias, hit = known
        else:
            alias = self._alias(wanted)
            target = self.aliases[alias] if alias else wanted
            found = self._find(target)
            if found is None:
                await self.refresh()
                found = self._find(target)
            if found is None:
                self._raise_missing(wanted, target)
            hit = found  # type: ignore[assignment]
            if len(self._resolved) < 1024:
                self._resolved[wanted] = (alias, hit)
        if alias in self.dimensions and alias not in self._checked:
            await self._check_dimension(alias, *hit)
        return hit

    def _down(self, target: str) -> list[tuple[str, str]]:
        """(engine, reason) of engines that could not list their models."""
        _, at, wanted_engine = target.rpartition("@")
        return [
            (e.name, str(getattr(e, "discovery_error", None)))
            for e in self.engines
            if getattr(e, "discovery_error", None) and (not at or e.name == wanted_engine)
        ]

    def _raise_missing(self, wanted: str, target: str) -> None:
        down = self._down(target)
        names = sorted(self._table) + sorted(self.aliases)
        # a near miss of a served name is a typo, not a model of the upstream that is down
        near = [] if "@" in target else difflib.get_close_matches(wanted, names, n=1, cutoff=0.8)
        if down and not near:
            name, reason = down[0]
            raise EngineUnavailable(
                f"model {wanted!r} is not available: upstream {name!r} is unreachable ({reason}), so its "
                f"models are unknown; start it or check its urls in hearth.toml (served now: "
                f"{', '.join(names) or 'none'})",
                retry_after=5,
            )
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise NotFound(
            # Ollama's wording ("model 'x' not found"): tools that pull a missing model match on it
            f"model {wanted!r} not found{hint}; available: {', '.join(names) or 'none'}",
            param="model",
        )

    async def _check_dimension(self, alias: str, engine: Engine, info: ModelInfo) -> None:
        """Refuse an embedding alias whose model cannot give the required size."""
        want = self.dimensions[alias]
        native = info.embedding_dimension
        if native is None:
            probe = await engine.embed(info, EmbedRequest(model=info.id, inputs=["dimension probe"]))
            native = len(probe.vectors[0])
            info.embedding_dimension = native
        if want != native and want not in info.embedding_dimensions:
            raise AliasError(
                f"alias {alias!r} requires {want}-dimensional embeddings, but model {info.id!r} gives "
                f"{native}; point the alias at a model with {want} dimensions, or set dimension = {native} "
                "in [aliases." + alias + "] (and size the vector column to match)",
                param="model",
            )
        self._checked.add(alias)

    async def check_aliases(self, default_set: bool = True) -> None:
        """At startup: every alias must point at a served model of the right size, and so must the
        default model when the configuration named it (`default_set`; else a warning: the bundled
        model may have been removed on purpose).

        Aliases whose engine could not list its models are left for the first
        request (a warning is logged); unknown dimensions are checked then too.
        """
        await self.refresh()
        default = self.default_model
        if self._alias(default) is None and self._find(default) is None and not self._down(default):
            names = ", ".join(sorted(self._table)) or "none"
            problem = (f"default_model {default!r} is not served (served: {names}); set default_model "
                       "(--model, HEARTH_DEFAULT_MODEL or hearth.toml) to one of them or to an alias")
            if default_set:
                raise AliasError(problem)
            log.warning("%s; requests that name no model will get a 404", problem)
        for alias, target in self.aliases.items():
            hit = self._find(target)
            if hit is None:
                if self._down(target):
                    log.warning("alias %r -> %r not checked: %s is unreachable", alias, target,
                                self._down(target)[0][0])
                    continue
                names = ", ".join(sorted(self._table)) or "none"
                raise AliasError(f"alias {alias!r} points to {target!r}, which no engine serves "
                                 f"(served: {names}); fix the alias in hearth.toml")
            if alias in self.dimensions and hit[1].embedding_dimension is not None:
                await self._check_dimension(alias, *hit)
