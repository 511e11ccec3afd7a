"""Helpers shared by the dialects: bounded JSON bodies, validation errors, streams."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from hearth.core.errors import BadRequest, EngineUnavailable, PayloadTooLarge

log = logging.getLogger("hearth.api")
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class JSONResponse(Response):
    """JSON via orjson (fast, and rejects NaN instead of emitting invalid JSON)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def read_json(request: Request, limit: int) -> Any:
    """Read and parse a JSON body no larger than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit} (setting max_body_bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes (setting max_body_bytes)")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise BadRequest("request body is empty; send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def parse(model: type[M], data: Any) -> M:
    """Validate `data` as `model`; a 400 names the first wrong field."""
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "union")))
        loc = loc or "body"
        got = err.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        raise BadRequest(f"field {loc!r}: {err['msg']} (got {shown})", param=loc) from None
    unknown = parsed.unknown_fields() if hasattr(parsed, "unknown_fields") else []
    if unknown:
        log.info("ignoring unknown fields %s in %s", unknown, model.__name__)
    return parsed


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client goes away first.

    `work` runs in this task; only the watcher is a task of its own (one task
    per request, not two: this is on every non-streamed request's path).
    """
    me = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone = True
                if me is not None:
                    me.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and me is not None and me.uncancel() == 0:
            raise EngineUnavailable("client disconnected") from None
        raise
    finally:
        watcher.cancel()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators, yielding (index, item) as they come."""
    if len(streams) == 1:  # the common case: no tasks, no queue
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, bool]] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item, False))
        except BaseException as exc:  # forwarded to the consumer, not swallowed
            await queue.put((i, exc, True))
            return
        await queue.put((i, None, True))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item, finished = await queue.get()
            if finished:
                remaining -= 1
                if isinstance(item, BaseException):
                    raise item
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
