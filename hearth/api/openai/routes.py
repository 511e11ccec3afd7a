"""Thin OpenAI routes: parse -> convert -> router/engine -> convert back."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hearth.api.auth import visible_models
from hearth.api.common import (
    JSONResponse,
    LastPiece,
    Stream,
    merge,
    parse,
    read_json,
    until_disconnect,
)
from hearth.api.openai import convert
from hearth.api.openai import schemas as w
from hearth.core import serving
from hearth.core.errors import HearthError
from hearth.core.structured import validate_output
from hearth.core.types import Chunk, GenerateRequest, Usage

log = logging.getLogger("hearth.openai")


def sse(obj: Any) -> bytes:
    """One server-sent event."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_error(err: HearthError) -> bytes:
    """An error event in OpenAI's envelope (the SDK raises on it)."""
    return sse(convert.error_body(err))


def _stream_response(body: AsyncIterator[bytes]) -> Stream:
    return Stream(body, "text/event-stream", {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def chat_completions(request: Request) -> Response:
    state = request.app.state.hearth
    wire = parse(w.ChatCompletionRequest, await read_json(request, state.settings.max_body_bytes))
    req = convert.chat_request(wire)
    engine, info = await state.router.resolve(req.model)
    name = wire.model or info.id
    state.limit_max_tokens(req)
    gens = await serving.start(engine, info, req, wire.n)
    rid = serving.new_id("chatcmpl")
    if wire.stream:
        include_usage = bool(wire.stream_options and wire.stream_options.include_usage)
        return _stream_response(_chat_stream(rid, name, gens, req, include_usage))
    results = await until_disconnect(request, serving.collect_all(gens, req))
    lp = req.logprobs is not None
    choices = [convert.chat_choice(i, r.text, r.finish_reason, r.tool_calls, r.logprobs if lp else None, r.thinking)
               for i, r in enumerate(results)]
    return JSONResponse(convert.chat_response(rid, name, choices, serving.total_usage(results)))


async def _chat_stream(
    rid: str, model: str, gens: list, req: GenerateRequest, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE events of the choices, then usage and [DONE]; a failure ends the stream with an error event
    (the status line is gone by then); the generations are always released."""
    out: list[bytes] = []
    try:
        created = int(time.time())
        texts = ["" for _ in gens]
        calls = [0 for _ in gens]  # tool calls sent so far per choice: the index of the next one
        usages: list[Usage] = [Usage(prompt_tokens=g.prompt_tokens) for g in gens]
        single = len(gens) == 1
        # Events of one chunk leave together (one send); the role events wait for the first chunk, and
        # with one choice its last chunk waits for usage and [DONE], which follow at once.
        out += [sse(convert.chat_chunk(rid, created, model, i, {"role": "assistant", "content": "", "refusal": None},
                                       None)) for i in range(len(gens))]
        async for i, chunk in merge([aiter(g) for g in gens]):
            chunk: Chunk
            logprobs = convert.chat_logprobs(chunk.logprobs) if req.logprobs is not None else None
            if chunk.thinking:
                out.append(sse(convert.chat_chunk(rid, created, model, i, {"reasoning_content": chunk.thinking}, None)))
            if chunk.text:
                texts[i] += chunk.text
                out.append(sse(convert.chat_chunk(rid, created, model, i, {"content": chunk.text}, None, logprobs)))
            if chunk.tool_calls:
                deltas = [convert.tool_call_body(c, calls[i] + k) for k, c in enumerate(chunk.tool_calls)]
                calls[i] += len(deltas)
                out.append(sse(convert.chat_chunk(rid, created, model, i, {"tool_calls": deltas}, None,
                                                  None if chunk.text else logprobs)))
            if chunk.finish_reason:
                if chunk.usage:
                    usages[i] = chunk.usage
                out.append(sse(convert.chat_chunk(rid, created, model, i, {}, chunk.finish_reason)))
                if not calls[i]:
                    validate_output(texts[i], req.response_format, chunk.finish_reason)
                if single:
                    continue
            if out:
                yield b"".join(out)
                out.clear()
        if include_usage:
            results = [serving.Result(t, "stop", u) for t, u in zip(texts, usages)]
            out.append(sse(convert.usage_chunk(rid, created, model, "chat.completion.chunk",
                                               serving.total_usage(results))))
        out.append(b"data: [DONE]\n\n")
        yield LastPiece(b"".join(out))
    except HearthError as err:  # what was held back goes first (a finish chunk before its error)
        out.append(sse_error(err))
        yield b"".join(out)
    finally:
        for g in gens:
            await g.aclose()


async def completions(request: Request) -> Response:
    state = request.app.state.hearth
    wire = parse(w.CompletionRequest, await read_json(request, state.settings.max_body_bytes))
    prompts = convert.completion_prompts(wire)
    reqs = [convert.completion_request(wire, p) for p in prompts]
    engine, info = await state.router.resolve(reqs[0].model)
    name = wire.model or info.id
    gens = []
    try:
        for r in reqs:
            state.limit_max_tokens(r)
            gens.extend(await serving.start(engine, info, r, wire.n))
    except BaseException:
        for g in gens:
            await g.aclose()
        raise
    rid = serving.new_id("cmpl")
    # echo: each choice starts with its prompt
    echoes = [(r.prompt or "") if wire.echo else "" for r in reqs for _ in range(wire.n)]
    if wire.stream:
        include_usage = bool(wire.stream_options and wire.stream_options.include_usage)
        return _stream_response(_completion_stream(rid, name, gens, reqs[0], include_usage, echoes))
    results = await until_disconnect(request, serving.collect_all(gens, reqs[0]))
    lp = reqs[0].logprobs is not None
    choices = [convert.completion_choice(i, echoes[i] + r.text, r.finish_reason,
                                         convert.completion_logprobs(r.logprobs) if lp else None)
               for i, r in enumerate(results)]
    usage = serving.total_usage(results)
    usage.prompt_tokens = sum(g.prompt_tokens for g in gens[:: wire.n])
    return JSONResponse(convert.completion_response(rid, int(time.time()), name, choices, usage))


async def _completion_stream(
    rid: str, model: str, gens: list, req: GenerateRequest, include_usage: bool, echoes: list[str]
) -> AsyncIterator[bytes]:
    """SSE events of legacy completions (echoed prompts first), usage and [DONE]; errors as for chat."""
    try:
        created = int(time.time())
        texts = ["" for _ in gens]
        completion_tokens = 0
        for i, echo in enumerate(echoes):
            if echo:
                yield sse(convert.completion_response(rid, created, model, [convert.completion_choice(i, echo, None)], None))
        async for i, chunk in merge([aiter(g) for g in gens]):
            logprobs = convert.completion_logprobs(chunk.logprobs, len(texts[i])) if req.logprobs is not None else None
            if chunk.text:
                texts[i] += chunk.text
            if chunk.text or chunk.finish_reason:
                choice = convert.completion_choice(i, chunk.text, chunk.finish_reason, logprobs)
                yield sse(convert.completion_response(rid, created, model, [choice], None))
            if chunk.finish_reason:
                completion_tokens += chunk.usage.completion_tokens if chunk.usage else 0
                validate_output(texts[i], req.response_format, chunk.finish_reason)
        if include_usage:
            usage = Usage(prompt_tokens=sum(g.prompt_tokens for g in gens), completion_tokens=completion_tokens)
            yield sse(convert.usage_chunk(rid, created, model, "text_completion", usage))
        yield b"data: [DONE]\n\n"
    except HearthError as err:
        yield sse_error(err)
    finally:
        for g in gens:
            await g.aclose()


async def embeddings(request: Request) -> Response:
    state = request.app.state.hearth
    wire = parse(w.EmbeddingRequest, await read_json(request, state.settings.max_body_bytes))
    req = convert.embed_request(wire)
    engine, info = await state.router.resolve(req.model)
    result = await until_disconnect(request, serving.embed(engine, info, req))
    result.model = wire.model or info.id
    return JSONResponse(convert.embed_response(result, wire.encoding_format))


async def list_models(request: Request) -> Response:
    state = request.app.state.hearth
    data = [convert.model_body(m) for m in visible_models(request.scope, await state.router.models())]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    state = request.app.state.hearth
    name = request.path_params["model"]
    _, info = await state.router.resolve(name)
    return JSONResponse(convert.model_body(info, name))


def routes() -> list[Route]:
    """The OpenAI dialect's routes, mounted under /v1."""
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    ]
