"""Dialect-neutral serving steps: admit n generations, collect, validate."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hearth.core import record
from hearth.core.engine import Engine, Generation
from hearth.core.errors import BadRequest
from hearth.core.structured import check_enforceable, check_schema, validate_output
from hearth.core.types import (
    Chunk,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    ModelInfo,
    TokenLogprob,
    ToolCall,
    Usage,
)


def new_id(prefix: str) -> str:
    """A request id like `chatcmpl-3f2a...` (an identifier, not a secret: no system call for it)."""
    return f"{prefix}-{random.getrandbits(96):024x}"


def check_request(req: GenerateRequest, grammar: bool = True) -> None:
    """Fail closed on structured-output schemas no grammar can enforce.

    Engines that pass the schema through to an upstream (`passes_format_through`)
    only need a valid schema: the upstream enforces it and hearth validates the result.
    """
    if req.response_format.type != "json_schema":
        return
    if grammar and req.response_format.strict:
        check_enforceable(req.response_format.schema)
    else:  # an upstream enforces it, or `strict: false` asked for best effort (the grammar leaves out the rest)
        check_schema(req.response_format.schema)


class Observed:
    """A generation that notes first token and usage in the request record.

    An async iterator class, not an async generator (asyncio registers each
    of those in a weak set: per request, on the hot path).
    """

    def __init__(self, gen: Generation, count_prompt: bool) -> None:
        self.gen = gen
        self.prompt_tokens = gen.prompt_tokens
        self.count_prompt = count_prompt
        self._it: AsyncIterator[Chunk] | None = None

    def __aiter__(self) -> Observed:
        self._it = aiter(self.gen)
        return self

    async def __anext__(self) -> Chunk:
        if self._it is None:
            self._it = aiter(self.gen)
        chunk = await anext(self._it)
        if chunk.text or chunk.tool_calls or chunk.thinking or chunk.refusal:
            record.note_first_token()
        if chunk.usage is not None:
            u = chunk.usage
            record.note_usage(u if self.count_prompt else Usage(completion_tokens=u.completion_tokens))
        return chunk

    async def aclose(self) -> None:
        await self.gen.aclose()


async def embed(engine: Engine, info: ModelInfo, req: EmbedRequest) -> EmbedResult:
    """Embed through `engine`, noting the model and prompt tokens in the request record."""
    record.note_model(info)
    result = await engine.embed(info, req)
    record.note_usage(Usage(prompt_tokens=result.prompt_tokens))
    return result


def check_tool_support(engine: Engine, info: ModelInfo, req: GenerateRequest) -> None:
    """Tool calling goes only to engines that can do it (upstreams pass it through)."""
    if req.uses_tools and not getattr(engine, "supports_tools", False):
        raise BadRequest(
            f"model {info.id!r} is served by engine {engine.name!r}, which does not support tool calling yet; "
            "remove `tools` (and tool calls from the history), or use a model on an upstream "
            "(llama-server, vLLM, Ollama) that supports it",
            param="tools",
        )


def check_logprob_support(engine: Engine, info: ModelInfo, req: GenerateRequest) -> None:
    """Log probabilities come only from engines that give them (the in-box engine, upstreams)."""
    if req.logprobs is not None and not getattr(engine, "supports_logprobs", False):
        raise BadRequest(
            f"model {info.id!r} is served by engine {engine.name!r}, which does not return log probabilities; "
            "remove `logprobs`, or use a model on the in-box engine or an upstream",
            param="logprobs",
        )


def check_think_support(engine: Engine, info: ModelInfo, req: GenerateRequest) -> None:
    """Thinking can be asked of upstreams (whose models may think); the in-box models do not."""
    if req.think not in (None, False) and not getattr(engine, "supports_thinking", False):
        if record.dialect() == "openai":  # the field an OpenAI client sent
            raise BadRequest(f"model {info.id!r} does not support reasoning; drop `reasoning_effort` or send "
                             "\"none\"", param="reasoning_effort")
        raise BadRequest(f"model {info.id!r} does not support thinking; drop `think` (or set it to false)",
                         param="think")


def check_capacity(engine: Engine, total: int, what: str, param: str) -> None:
    """More generations at once than the engine can ever hold is a 400: a 429 would be retried in vain
    (clients retry 429s on their own), each time after starting all of them."""
    capacity = getattr(engine, "capacity", None)
    if capacity is not None and total > capacity:
        raise BadRequest(f"{what} asks for {total} generations at once, but this server holds at most {capacity} "
                         "per model (settings slots + max_queue); send fewer, or raise max_queue", param=param)


async def start(engine: Engine, info: ModelInfo, req: GenerateRequest, n: int = 1) -> list[Generation]:
    """Admit `n` generations of the same request (seed+i for each choice)."""
    if n > 1:
        check_capacity(engine, n, f"n={n}", "n")
    # each check only when the request asks for what it guards (most ask for none of it)
    if req.response_format.type == "json_schema":
        check_request(req, grammar=not getattr(engine, "passes_format_through", False))
    if (req.tools or req.messages) and not getattr(engine, "supports_tools", False):
        check_tool_support(engine, info, req)
    if req.logprobs is not None:
        check_logprob_support(engine, info, req)
    if req.think not in (None, False):
        check_think_support(engine, info, req)
    record.note_model(info)
    gens: list[Generation] = []
    try:
        for i in range(n):
            one = req if i == 0 else dataclasses.replace(
                req,
                sampling=dataclasses.replace(
                    req.sampling, seed=None if req.sampling.seed is None else req.sampling.seed + i
                ),
            )
            gens.append(Observed(await engine.generate(info, one), count_prompt=i == 0))
    except BaseException:
        for g in gens:
            await g.aclose()
        raise
    return gens


@dataclass(slots=True)
class Result:
    """A finished generation."""

    text: str
    finish_reason: str
    usage: Usage
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    thinking: str = ""
    refusal: str = ""


async def collect(gen: Generation, req: GenerateRequest) -> Result:
    """Run a generation to the end and check structured output (unless it ended in tool calls)."""
    parts: list[str] = []
    calls: list[ToolCall] = []
    logprobs: list[TokenLogprob] = []
    thinking: list[str] = []
    refusal = ""
    finish = "stop"
    usage = Usage(prompt_tokens=gen.prompt_tokens)
    try:
        async for chunk in gen:
            parts.append(chunk.text)
            if chunk.tool_calls:
                calls.extend(chunk.tool_calls)
            logprobs.extend(chunk.logprobs)
            if chunk.thinking:
                thinking.append(chunk.thinking)
            refusal += chunk.refusal
            if chunk.finish_reason:
                finish = chunk.finish_reason
            if chunk.usage:
                usage = chunk.usage
    finally:
        await gen.aclose()
    text = "".join(parts)
    if not calls and not refusal:
        validate_output(text, req.response_format, finish)
    return Result(text=text, finish_reason=finish, usage=usage, tool_calls=calls, logprobs=logprobs,
                  thinking="".join(thinking), refusal=refusal)


async def collect_all(gens: list[Generation], req: GenerateRequest) -> list[Result]:
    """Collect several generations concurrently (they share the engine's batch)."""
    if len(gens) == 1:  # the common case: no task
        return [await collect(gens[0], req)]
    try:
        return list(await asyncio.gather(*(collect(g, req) for g in gens)))
    finally:
        for g in gens:
            await g.aclose()


def total_usage(results: list[Result]) -> Usage:
    """Sum usage over the choices of one request (prompt counted once)."""
    first = results[0].usage
    if len(results) == 1:
        return first
    return Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=sum(r.usage.completion_tokens for r in results),
        cached_tokens=first.cached_tokens,
        load_ns=first.load_ns,
        prompt_ns=first.prompt_ns,
        generate_ns=max(r.usage.generate_ns for r in results),
        total_ns=max(r.usage.total_ns for r in results),
    )
