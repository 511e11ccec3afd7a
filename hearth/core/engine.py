"""The contract every engine implements (in-box llama.cpp, upstreams, fake).

An engine serves models. `generate` admits a request (raising a
`HearthError` if it cannot: unknown model, prompt too long, queue full) and
returns a `Generation`, an async iterator of `Chunk`s that ends with a chunk
carrying `finish_reason` and `usage`. Closing the generation early cancels it.

Optional: `async show(model)` fills in what an engine can learn about a
model only on demand (an Ollama upstream's `/api/show`); /api/show calls it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from hearth.core.types import (
    Chunk,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    LoadedModel,
    ModelInfo,
)


@runtime_checkable
class Generation(Protocol):
    """A running generation: iterate for chunks, `aclose()` to cancel."""

    prompt_tokens: int

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """A source of tokens and vectors for one or more models."""

    name: str

    async def start(self) -> None:
        """Prepare the engine (may load the default model)."""

    async def close(self) -> None:
        """Stop workers and release resources."""

    async def list_models(self) -> list[ModelInfo]:
        """Models this engine can serve right now (from memory: listing must not wait on the network)."""

    async def generate(self, model: ModelInfo, req: GenerateRequest) -> Generation:
        """Admit a request and start generating; raises `HearthError` if refused."""

    async def embed(self, model: ModelInfo, req: EmbedRequest) -> EmbedResult:
        """Embed texts; vectors are L2-normalised."""

    async def ready(self) -> bool:
        """True when the engine can answer a request now."""

    async def loaded(self) -> list[LoadedModel]:
        """Models held in memory, with their expiry."""

    async def load(self, model: ModelInfo, keep_alive: float | None) -> float:
        """Load a model and set its keep-alive (seconds; None = default,
        negative = forever). Returns the load time in seconds."""

    async def unload(self, model: ModelInfo) -> None:
        """Release a model's memory now."""
