"""A scripted engine for tests and `hearth serve --fake`: deterministic, instant.

Tokens are words. Output is a pseudo-random word sequence seeded by the
request's seed and prompt, so determinism and stop handling can be tested
without a model. A prompt containing `FAIL_MIDSTREAM` raises after two tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections.abc import AsyncIterator

from hearth.core.errors import BadRequest, ContextLengthExceeded, EngineUnavailable
from hearth.core.types import (
    Chunk,
    EmbedRequest,
    EmbedResult,
    FinishReason,
    GenerateRequest,
    LoadedModel,
    ModelInfo,
    Usage,
)

WORDS = "the a hearth fire warm home light stone wood smoke quiet night bread tea cat dog".split()


def prompt_text(req: GenerateRequest) -> str:
    """The text a fake model 'reads': raw prompt or joined messages."""
    if req.messages is not None:
        return "\n".join(f"{m.role}: {m.content}" for m in req.messages)
    return req.prompt or ""


class FakeGeneration:
    """Yields words with an optional delay; honours stop strings and max_tokens."""

    def __init__(self, req: GenerateRequest, prompt_tokens: int, delay: float, ctx: int) -> None:
        self.req = req
        self.prompt_tokens = prompt_tokens
        self.delay = delay
        self.ctx = ctx
        self.closed = False

    def _words(self) -> list[str]:
        seed = self.req.sampling.seed
        text = prompt_text(self.req)
        rng = random.Random(f"{seed}:{text}" if seed is not None else None)
        if self.req.response_format.type != "text":
            return ['{"fake":', " true}"]
        limit = self.req.max_tokens or min(self.ctx - self.prompt_tokens, self.req.max_tokens_cap or self.ctx)
        return [(" " if i else "") + rng.choice(WORDS) for i in range(min(limit, 64) + 8)]

    async def _run(self) -> AsyncIterator[Chunk]:
        start = time.perf_counter_ns()
        limit = self.req.max_tokens or min(self.ctx - self.prompt_tokens, self.req.max_tokens_cap or self.ctx)
        out = ""
        count = 0
        finish: FinishReason = "length"
        for word in self._words():
            if count >= limit:
                break
            if self.delay:
                await asyncio.sleep(self.delay)
            if "FAIL_MIDSTREAM" in prompt_text(self.req) and count == 2:
                raise EngineUnavailable("fake engine failed mid-stream (as asked)")
            if "CRASH_MIDSTREAM" in prompt_text(self.req) and count == 2:  # a bug, not an engine error
                raise RuntimeError("fake engine crashed mid-stream (as asked)")
            count += 1
            candidate = out + word
            cut = min((candidate.find(s) for s in self.req.stop if s in candidate), default=-1)
            if cut >= 0:
                tail = candidate[len(out):cut]
                if tail:
                    yield Chunk(text=tail)
                finish = "stop"
                break
            out = candidate
            yield Chunk(text=word)
        else:
            finish = "stop"
        elapsed = time.perf_counter_ns() - start
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=count, prompt_ns=1000,
                      generate_ns=elapsed, total_ns=elapsed + 1000)
        yield Chunk(finish_reason=finish, usage=usage)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._run()

    async def aclose(self) -> None:
        self.closed = True


class FakeEngine:
    """An engine serving `fake:latest` (and `fake-embed:latest`) with no model."""

    name = "fake"

    def __init__(self, delay: float = 0.0, context_length: int = 2048, dimension: int = 16) -> None:
        self.delay = delay
        self.context_length = context_length
        self.dimension = dimension
        self._loaded: dict[str, LoadedModel] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._loaded.clear()

    async def list_models(self) -> list[ModelInfo]:
        return [
            ModelInfo(id="fake:latest", engine=self.name, context_length=self.context_length,
                      embedding_dimension=self.dimension, capabilities=["completion", "embedding"],
                      architecture="fake", family="fake", parameter_count=1, quantization="F32"),
        ]

    async def generate(self, model: ModelInfo, req: GenerateRequest) -> FakeGeneration:
        prompt_tokens = len(prompt_text(req).split())
        if any(m.images for m in req.messages or []):
            raise BadRequest(f"model {model.id!r} cannot see images; send text only", param="messages")
        if prompt_tokens >= self.context_length:
            raise ContextLengthExceeded(
                f"prompt is {prompt_tokens} tokens; model {model.id!r} has a context of {self.context_length}",
                param="messages",
            )
        self._touch(model, req.keep_alive)
        return FakeGeneration(req, prompt_tokens, self.delay, self.context_length)

    async def embed(self, model: ModelInfo, req: EmbedRequest) -> EmbedResult:
        if req.dimensions not in (None, self.dimension):
            raise BadRequest(
                f"model {model.id!r} gives {self.dimension}-dimensional embeddings and declares no "
                f"shorter sizes; drop `dimensions` or ask for {self.dimension}",
                param="dimensions",
            )
        vectors = []
        for text in req.inputs:
            digest = hashlib.sha256(text.encode()).digest()
            vec = [b - 127.5 for b in digest[: self.dimension]]
            norm = math.sqrt(sum(x * x for x in vec)) or 1.0
            vectors.append([x / norm for x in vec])
        self._touch(model, req.keep_alive)
        return EmbedResult(vectors=vectors, prompt_tokens=sum(len(t.split()) for t in req.inputs), model=model.id)

    def _touch(self, model: ModelInfo, keep_alive: float | None) -> None:
        ka = 300.0 if keep_alive is None else keep_alive
        if ka == 0:
            self._loaded.pop(model.id, None)
            return
        expires = None if ka < 0 else time.time() + ka
        self._loaded[model.id] = LoadedModel(model.id, 1024, self.context_length, expires)

    async def ready(self) -> bool:
        return True

    async def loaded(self) -> list[LoadedModel]:
        now = time.time()
        return [m for m in self._loaded.values() if m.expires_at is None or m.expires_at > now]

    async def load(self, model: ModelInfo, keep_alive: float | None) -> float:
        self._touch(model, keep_alive)
        return 0.0

    async def unload(self, model: ModelInfo) -> None:
        self._loaded.pop(model.id, None)
