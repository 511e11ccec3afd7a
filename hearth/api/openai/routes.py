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
    stream_failed,
    until_disconnect,
)
from hearth.api.openai import convert
from hearth.api.openai import schemas as w
from hearth.core import serving
from hearth.core.errors import HearthError, internal_error
from hearth.core.structured import validate_output
from hearth.core.types import Chunk, GenerateRequest, Usage

log = logging.getLogger("hearth.openai")


def sse(obj: Any) -> bytes:
    """One server-sent event."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_error(err: HearthError) -> bytes:
    """An error event in OpenAI's envelope (the SDK raises on it)."""
    stream_failed(err)
    return sse(convert.error_body(err))


def _stream_response(body: AsyncIterator[bytes]) -> Stream:
    return Stream(body, "text/event-stream", {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def chat_completions(request: Request) -> Response:
    state = request.app.state.hearth
    wire = parse(w.ChatCompletionRequest, await read_json(request, state.settings.max_body_bytes))
    req = convert.chat_request(wire)
    engine, info = await state.router.resolve(req.model)
    name = wire.model or info.id
    state.limit_max_tokens(req, "max_completion_tokens" if wire.max_completion_tokens is not None else "max_tokens")
    gens = await serving.start(engine, info, req, wire.n)
    rid = serving.new_id("chatcmpl")
    if wire.stream:
        include_usage = bool(wire.stream_options and wire.stream_options.include_usage)
        return _stream_response(ChatStream(rid, name, gens, req, include_usage))
    results = await until_disconnect(request, serving.collect_all(gens, req))
    lp = req.logprobs is not None
    choices = [convert.chat_choice(i, r.text, r.finish_reason, r.tool_calls, r.logprobs if lp else None, r.thinking,
                                   r.refusal) for i, r in enumerate(results)]
    return JSONResponse(convert.chat_response(rid, name, choices, serving.total_usage(results)))


ROLE_DELTA = {"role": "assistant", "content": "", "refusal": None}


class ChatStream:
    """SSE events of the choices, then usage and [DONE]; a failure ends the stream with an error event
    (the status line is gone by then). `aclose()` releases the generations (`Stream` calls it).

    Events of one chunk leave together (one piece); the role events wait for the first chunk, and with
    one choice its last chunk waits for usage and [DONE], which follow at once. An async iterator
    class, not an async generator (asyncio registers each of those in a weak set: per request).
    """

    def __init__(self, rid: str, model: str, gens: list[Any], req: GenerateRequest, include_usage: bool) -> None:
        self.gens = gens
        self.req = req
        self.include_usage = include_usage
        self.chunks = convert.ChatChunks(rid, int(time.time()), model, include_usage)
        self.texts = ["" for _ in gens]
        self.calls = [0 for _ in gens]  # tool calls sent so far per choice: the index of the next one
        self.usages: list[Usage] = [Usage(prompt_tokens=g.prompt_tokens) for g in gens]
        self.single = len(gens) == 1
        self.out = [self.chunks.event(i, ROLE_DELTA, None) for i in range(len(gens))]
        self.merged = merge([aiter(g) for g in gens])
        self.ended = False

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> bytes:
        if self.ended:
            raise StopAsyncIteration
        out = self.out
        try:
            while True:
                try:
                    i, chunk = await anext(self.merged)
                except StopAsyncIteration:
                    break
                self._add(i, chunk)
                if out and not (self.single and chunk.finish_reason):
                    piece = b"".join(out)
                    out.clear()
                    return piece
            if self.include_usage:
                c = self.chunks
                results = [serving.Result(t, "stop", u) for t, u in zip(self.texts, self.usages)]
                out.append(sse(convert.usage_chunk(c.rid, c.created, c.model, "chat.completion.chunk",
                                                   serving.total_usage(results))))
            out.append(b"data: [DONE]\n\n")
            self.ended = True
            return LastPiece(b"".join(out))
        except HearthError as err:  # what was held back goes first (a finish chunk before its error)
            out.append(sse_error(err))
            self.ended = True
            return b"".join(out)
        except Exception as exc:  # not ours (a bug): still an error event, not a stream cut short
            log.exception("unexpected error in a chat stream")
            out.append(sse_error(internal_error(exc)))
            self.ended = True
            return b"".join(out)
        except BaseException:
            self.ended = True
            await self.aclose()
            raise

    def _add(self, i: int, chunk: Chunk) -> None:
        """The events of one chunk of choice `i`, onto `out`."""
        req, out, chunks = self.req, self.out, self.chunks
        logprobs = convert.chat_logprobs(chunk.logprobs) if req.logprobs is not None else None
        if chunk.thinking:
            out.append(chunks.event(i, {"reasoning_content": chunk.thinking}, None))
        if chunk.text:
            self.texts[i] += chunk.text
            out.append(chunks.event(i, {"content": chunk.text}, None, logprobs))
        if chunk.tool_calls:
            deltas = [convert.tool_call_body(c, self.calls[i] + k) for k, c in enumerate(chunk.tool_calls)]
            self.calls[i] += len(deltas)
            out.append(chunks.event(i, {"tool_calls": deltas}, None, None if chunk.text else logprobs))
        if chunk.refusal:
            out.append(chunks.event(i, {"refusal": chunk.refusal}, None))
        if chunk.finish_reason:
            if chunk.usage:
                self.usages[i] = chunk.usage
            out.append(chunks.event(i, {}, chunk.finish_reason))
            if not self.calls[i] and not chunk.refusal:
                validate_output(self.texts[i], req.response_format, chunk.finish_reason)

    async def aclose(self) -> None:
        """Release the generations (once)."""
        self.ended = True
        gens, self.gens = self.gens, []
        for g in gens:
            await g.aclose()


async def completions(request: Request) -> Response:
    state = request.app.state.hearth
    wire = parse(w.CompletionRequest, await read_json(request, state.settings.max_body_bytes))
    prompts = convert.completion_prompts(wire)
    reqs = [convert.completion_request(wire, p) for p in prompts]
    engine, info = await state.router.resolve(reqs[0].model)
    name = wire.model or info.id
    if len(reqs) > 1:
        serving.check_capacity(engine, len(reqs) * wire.n, f"{len(reqs)} prompts with n={wire.n}", "prompt")
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
        return _stream_response(_completion_stream(rid, name, gens, reqs[0], include_usage, echoes, wire.n))
    results = await until_disconnect(request, serving.collect_all(gens, reqs[0]))
    lp = reqs[0].logprobs is not None
    choices = [convert.completion_choice(i, echoes[i] + r.text, r.finish_reason,
                                         convert.completion_logprobs(r.logprobs) if lp else None)
               for i, r in enumerate(results)]
    usage = serving.total_usage(results)
    usage.prompt_tokens = sum(g.prompt_tokens for g in gens[:: wire.n])
    return JSONResponse(convert.completion_response(rid, int(time.time()), name, choices, usage))


async def _completion_stream(
    rid: str, model: str, gens: list, req: GenerateRequest, include_usage: bool, echoes: list[str], n: int = 1
) -> AsyncIterator[bytes]:
    """SSE events of legacy completions (echoed prompts first), usage and [DONE]; errors as for chat."""
    try:
        created = int(time.time())
        texts = ["" for _ in gens]
        completion_tokens = 0

        def event(choice: dict[str, object]) -> bytes:
            body = convert.completion_response(rid, created, model, [choice], None)
            if include_usage:  # as the spec says and chat streams do: null on every chunk but the last
                body["usage"] = None
            return sse(body)

        for i, echo in enumerate(echoes):
            if echo:
                yield event(convert.completion_choice(i, echo, None))
        async for i, chunk in merge([aiter(g) for g in gens]):
            logprobs = convert.completion_logprobs(chunk.logprobs, len(texts[i])) if req.logprobs is not None else None
            if chunk.text:
                texts[i] += chunk.text
            if chunk.text or chunk.finish_reason:
                yield event(convert.completion_choice(i, chunk.text, chunk.finish_reason, logprobs))
            if chunk.finish_reason:
                completion_tokens += chunk.usage.completion_tokens if chunk.usage else 0
                validate_output(texts[i], req.response_format, chunk.finish_reason)
        if include_usage:
            # the n choices of one prompt share it: counted once, as for a non-streamed request
            usage = Usage(prompt_tokens=sum(g.prompt_tokens for g in gens[::n]), completion_tokens=completion_tokens)
            yield sse(convert.usage_chunk(rid, created, model, "text_completion", usage))
        yield b"data: [DONE]\n\n"
    except HearthError as err:
        yield sse_error(err)
    except Exception as exc:  # the status line is gone: the error must travel in the stream
        log.exception("unexpected error in a completions stream")
        yield sse_error(internal_error(exc))
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
        Route("/v1/models/", list_models, methods=["GET"]),  # not the default model's card for an empty id
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    ]
