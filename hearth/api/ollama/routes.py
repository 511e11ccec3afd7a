"""Thin Ollama routes: parse -> convert -> router/engine -> convert back.

Generation endpoints stream NDJSON (one JSON object a line) unless the body
says `"stream": false`. An error after the stream has started arrives as an
`{"error": "..."}` line before the stream closes (what Ollama clients expect);
errors before it are rendered by the app as `{"error": ...}` with a status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from hearth import __version__
from hearth.api.auth import visible_models
from hearth.api.common import JSONResponse, LastPiece, Stream, parse, read_json, stream_failed, until_disconnect
from hearth.api.ollama import convert
from hearth.api.ollama import schemas as w
from hearth.core import serving
from hearth.core.engine import Engine, Generation
from hearth.core.errors import BadRequest, HearthError, internal_error
from hearth.core.structured import validate_output
from hearth.core.types import EmbedRequest, EmbedResult, GenerateRequest, ModelInfo, Usage

log = logging.getLogger("hearth.ollama")

# The Ollama API level hearth speaks (specs/ollama-openapi.yaml). Clients gate
# features on `version`, so it names the API, not hearth; `hearth_version` does that.
OLLAMA_API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"


def ndjson(obj: Any) -> bytes:
    """One NDJSON line."""
    return orjson.dumps(obj) + b"\n"


def _created_at() -> str:
    return convert.rfc3339(time.time())


def _one(body: dict[str, Any], stream: bool) -> Response:
    """A single object: one NDJSON line when streaming was asked for, else JSON."""
    if stream:
        return Response(ndjson(body), media_type=NDJSON)
    return JSONResponse(body)


async def root(request: Request) -> Response:
    """`GET /` and `HEAD /`: the liveness text Ollama clients probe for."""
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    """`GET /api/version`."""
    return JSONResponse({"version": OLLAMA_API_VERSION, "hearth_version": __version__})


async def chat(request: Request) -> Response:
    """`POST /api/chat`."""
    t0 = time.perf_counter_ns()
    state = request.app.state.hearth
    wire = parse(w.ChatRequest, await read_json(request, state.settings.max_body_bytes))
    return await _serve(request, "chat", wire, convert.chat_request(wire), t0)


async def generate(request: Request) -> Response:
    """`POST /api/generate`."""
    t0 = time.perf_counter_ns()
    state = request.app.state.hearth
    wire = parse(w.GenerateRequest, await read_json(request, state.settings.max_body_bytes))
    return await _serve(request, "generate", wire, convert.generate_request(wire), t0)


async def _serve(request: Request, kind: str, wire: w.GenerationFields, req: GenerateRequest, t0: int) -> Response:
    state = request.app.state.hearth
    engine, info = await state.router.resolve(req.model)
    if convert.is_load_request(req):
        return _one(await _load(engine, info, kind, wire.model, req.keep_alive, t0), wire.stream)
    state.limit_max_tokens(req)
    gen = (await serving.start(engine, info, req))[0]
    if wire.stream:
        return Stream(_stream(kind, wire.model, gen, req, t0), NDJSON,
                      {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await until_disconnect(request, serving.collect(gen, req))
    total = time.perf_counter_ns() - t0
    return JSONResponse(convert.final_body(kind, wire.model, _created_at(), result.text + result.refusal,
                                           result.finish_reason,
                                           result.usage, total, result.tool_calls,
                                           result.logprobs if req.logprobs is not None else None, result.thinking))


async def _load(engine: Engine, info: ModelInfo, kind: str, name: str, keep_alive: float | None,
                t0: int) -> dict[str, Any]:
    """Empty prompt/messages: load the model (or unload it when keep_alive is 0)."""
    if keep_alive == 0:
        await engine.unload(info)
        reason, load_ns = "unload", 0
    else:
        load_ns = int(await engine.load(info, keep_alive) * 1e9)
        reason = "load"
    return convert.load_body(kind, name, _created_at(), reason, load_ns, time.perf_counter_ns() - t0)


async def _stream(kind: str, name: str, gen: Generation, req: GenerateRequest, t0: int) -> AsyncIterator[bytes]:
    """NDJSON lines of one generation, then the final `done: true` object (or an error line)."""
    check = req.response_format.type != "text"
    parts: list[str] = []
    calls = 0
    refused = False
    finish: str | None = None
    usage = Usage(prompt_tokens=gen.prompt_tokens)
    try:
        async for chunk in gen:
            logprobs = chunk.logprobs if req.logprobs is not None else None
            if chunk.thinking:
                yield ndjson(convert.chunk_body(kind, name, _created_at(), "", thinking=chunk.thinking))
            if chunk.text:
                if check:
                    parts.append(chunk.text)
                yield ndjson(convert.chunk_body(kind, name, _created_at(), chunk.text, logprobs=logprobs))
            if chunk.refusal:  # Ollama has no refusal field: the reason is the answer
                refused = True
                yield ndjson(convert.chunk_body(kind, name, _created_at(), chunk.refusal))
            if chunk.tool_calls:
                yield ndjson(convert.chunk_body(kind, name, _created_at(), "", chunk.tool_calls, calls,
                                                logprobs=logprobs if not chunk.text or logprobs is None else ()))
                calls += len(chunk.tool_calls)
            if chunk.finish_reason:
                finish = chunk.finish_reason
                usage = chunk.usage or usage
        if not calls and not refused:
            validate_output("".join(parts), req.response_format, finish)
        yield LastPiece(ndjson(convert.final_body(kind, name, _created_at(), "", finish, usage,
                                                  time.perf_counter_ns() - t0)))
    except HearthError as err:
        stream_failed(err)
        yield ndjson(convert.error_body(err.message))
    except Exception as exc:  # the status line is gone: the error must travel in the stream
        log.exception("unexpected error in an Ollama stream")
        yield ndjson(convert.error_body(internal_error(exc).message))
    finally:
        await gen.aclose()


async def _embed_or_load(request: Request, engine: Engine, info: ModelInfo, req: EmbedRequest) -> EmbedResult | None:
    """Embed the inputs; with none, only load (or unload, keep_alive 0) the model."""
    if req.inputs:
        return await until_disconnect(request, serving.embed(engine, info, req))
    if req.keep_alive == 0:
        await engine.unload(info)
    else:
        await engine.load(info, req.keep_alive)
    return None


async def embed(request: Request) -> Response:
    """`POST /api/embed`: one vector per input, L2-normalised."""
    t0 = time.perf_counter_ns()
    state = request.app.state.hearth
    wire = parse(w.EmbedRequest, await read_json(request, state.settings.max_body_bytes))
    req = convert.embed_request(wire)
    engine, info = await state.router.resolve(req.model)
    result = await _embed_or_load(request, engine, info, req)
    return JSONResponse(convert.embed_body(wire.model, result, time.perf_counter_ns() - t0))


async def embeddings(request: Request) -> Response:
    """`POST /api/embeddings` (legacy): `{"embedding": [...]}` for one prompt."""
    state = request.app.state.hearth
    wire = parse(w.EmbeddingsRequest, await read_json(request, state.settings.max_body_bytes))
    req = convert.embeddings_request(wire)
    engine, info = await state.router.resolve(req.model)
    return JSONResponse(convert.embeddings_body(await _embed_or_load(request, engine, info, req)))


async def tags(request: Request) -> Response:
    """`GET /api/tags`: every model hearth serves, with GGUF details."""
    state = request.app.state.hearth
    models = visible_models(request.scope, await state.router.models())
    return JSONResponse({"models": [convert.tag_body(m) for m in models]})


async def show(request: Request) -> Response:
    """`POST /api/show`: details, GGUF metadata, template, parameters, capabilities.

    `verbose` is accepted but changes nothing: hearth never reads the large
    tokenizer arrays of a GGUF, so there is nothing extra to show.
    """
    state = request.app.state.hearth
    wire = parse(w.ShowRequest, await read_json(request, state.settings.max_body_bytes))
    if not wire.model_name():
        raise BadRequest('field "model" is required; name the model to show', param="model")
    engine, info = await state.router.resolve(wire.model_name())
    learn = getattr(engine, "show", None)  # an engine that learns more on demand (Ollama upstreams)
    if learn is not None:
        await learn(info)
    return JSONResponse(convert.show_body(info))


async def ps(request: Request) -> Response:
    """`GET /api/ps`: models held in memory, their size, expiry and context length."""
    state = request.app.state.hearth
    infos = {m.id: m for m in await state.router.models()}
    allowed = {m.id for m in visible_models(request.scope, list(infos.values()))}
    owner = request.scope.get("hearth.key") is None
    now = time.time()
    models = [
        convert.ps_body(loaded, infos.get(loaded.id), now)
        for engine in state.engines
        for loaded in await engine.loaded()
        if loaded.id in allowed or (owner and loaded.id not in infos)
    ]
    return JSONResponse({"models": models})


def routes() -> list[Route]:
    """The Ollama dialect's routes (pull/delete/copy live with the model store)."""
    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/embeddings", embeddings, methods=["POST"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/ps", ps, methods=["GET"]),
    ]
