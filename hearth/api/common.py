"""Helpers shared by the dialects: bounded JSON bodies, validation errors, streams."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from hearth.core import record
from hearth.core.errors import BadRequest, EngineUnavailable, HearthError, PayloadTooLarge
from hearth.core.types import TokenLogprob

log = logging.getLogger("hearth.api")
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def stream_failed(err: HearthError) -> None:
    """A response that had started ends in `err` (an error event): its usage row counts the
    failure, and a server-side one is logged with the request id, as a 5xx before the start is."""
    rec = record.current()
    if rec is not None:
        rec.status = err.status
    if err.status >= 500:
        log.warning("%s stream ended with %d [%s]: %s", rec.route if rec else "-", err.status,
                    rec.request_id if rec else "-", err.message)


class JSONResponse(Response):
    """JSON via orjson (fast, and rejects NaN instead of emitting invalid JSON).

    Without extra headers (nearly every answer) the head is built directly
    rather than through Starlette's general `init_headers`.
    """

    media_type = "application/json"

    def __init__(self, content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> None:
        if headers:
            super().__init__(content, status_code, headers)
            return
        self.status_code = status_code
        self.background = None
        self.body = orjson.dumps(content)
        self.raw_headers = [(b"content-length", b"%d" % len(self.body)), (b"content-type", b"application/json")]

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class DisconnectWatch:
    """Cancels the current task if the client disconnects (see `until_disconnect`, `Stream`).

    hearth's own HTTP protocol says when a client leaves (the scope extension
    `hearth.on_disconnect`): then watching costs nothing. Under another server
    a watcher task reads `receive` for `http.disconnect`, starting only after
    `WATCH_AFTER` seconds: most answers are done by then and never pay for a
    task of their own; a client that leaves early is noticed at that point.
    """

    WATCH_AFTER = 0.05

    def __init__(self, scope: Scope, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.receive = receive
        self.gone = False
        self._watcher: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._hook = (scope.get("extensions") or {}).get("hearth.on_disconnect")
        if self._hook is not None:
            self._hook(self._left)
        else:
            self._timer = asyncio.get_running_loop().call_later(self.WATCH_AFTER, self._start)

    def _left(self) -> None:
        self.gone = True
        self.task.cancel()

    def _start(self) -> None:
        self._timer = None
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.task.cancel()

    def stop(self) -> None:
        """No more watching (call before the response completes: uvicorn then reports a disconnect)."""
        if self._hook is not None:
            self._hook(None)
            self._hook = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()

    def left(self) -> bool:
        """After a CancelledError: True if it was this watch's (the client left), consuming it."""
        return self.gone and self.task.uncancel() == 0


class LastPiece(bytes):
    """A body iterator's last piece, marked so: `Stream` sends it as the end of the body (one send fewer)."""


class Stream(Response):
    """A streamed body that stops (closing the body iterator) when the client leaves.

    Starlette's StreamingResponse spends a task group and two tasks per
    response on watching for the disconnect; here the body runs in the
    request's own task with a `DisconnectWatch`.
    """

    def __init__(self, body: AsyncIterator[bytes], media_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        if media_type.startswith("text/") and "charset=" not in media_type:  # as Starlette says it
            media_type += "; charset=utf-8"
        self.raw_headers = [(b"content-type", media_type.encode("latin-1"))]
        for name, value in (headers or {}).items():
            self.raw_headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watch = DisconnectWatch(scope, receive)
        try:
            end = b""
            async for piece in self.body_iterator:
                if type(piece) is LastPiece:
                    end = piece
                    break
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            watch.stop()
            if watch.gone:  # left just as the body ended: take the cancel meant for the body
                await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": end, "more_body": False})
        except asyncio.CancelledError:
            if not watch.left():
                raise
            log.debug("client left during a stream: %s %s", scope.get("method"), scope.get("path"))
        finally:
            watch.stop()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _check_declared_length(scope: Scope, limit: int) -> None:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"request body is {int(value)} bytes; the limit is {limit} (setting max_body_bytes)")


async def read_json(request: Request, limit: int, allow_empty: bool = False) -> Any:
    """Read and parse a JSON body no larger than `limit` bytes (an empty one is {} if `allow_empty`)."""
    chunks: list[bytes] = []
    size = 0
    receive = request.receive  # straight from ASGI: Request.stream() is an async generator per request
    if request.scope.get("hearth.expect_continue"):  # before `100 Continue`: the client need not send it
        _check_declared_length(request.scope, limit)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes (setting max_body_bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
        if len(chunks) == 1:  # more to come: refuse a declared oversize body before reading it all
            _check_declared_length(request.scope, limit)
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if not raw.strip():
        if allow_empty:
            return {}
        raise BadRequest("request body is empty; send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


# pydantic's names for the members of a union (`str`, `list[str]`, `dict[str,any]`) and for its wrappers,
# in an error's location: not part of the request's field path (the wire models have no union with a
# model class as a bare member, whose tag would be its class name)
MEMBER_TAG = re.compile(r"str|int|float|bool|bytes|none|any|[a-z][a-z-]*\[.*\]|function-.*|union.*")
KINDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
         "list[str]": "a list of strings"}


def _path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(p for p in loc if not (isinstance(p, str) and MEMBER_TAG.fullmatch(p)))


def _kind(tag: str) -> str:
    return KINDS.get(tag) or ("a list" if tag.startswith("list[") else "an object")


def _shown(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def telling_error(errors: list[Any]) -> tuple[str, str]:
    """(field path, message) of the error to report from pydantic's list.

    A field of several types fails once per type; the first failure is rarely
    the one that matters: `content: [{"text": 5}]` fails as "not a string" at
    `content`, and as the real problem at `content.0.text`. So the error that
    got furthest into the request wins, and when every type failed at the field
    itself, the message lists the types it takes.
    """
    def progress(e: Any) -> tuple[int, list[int]]:
        path = _path(e["loc"])
        return len(path), [p for p in path if isinstance(p, int)]

    def member(loc: tuple[Any, ...]) -> tuple[Any, ...]:  # the location up to its last union member tag
        tags = [i for i, p in enumerate(loc) if isinstance(p, str) and MEMBER_TAG.fullmatch(p)]
        return tuple(loc[:tags[-1] + 1]) if tags else ()

    first: dict[tuple[Any, ...], Any] = {}  # each type's first failure: how far that type got
    for e in errors:
        m = member(e["loc"])
        if m not in first or progress(e) < progress(first[m]):
            first[m] = e
    best = max(progress(e) for e in first.values())
    top = [e for e in first.values() if progress(e) == best]
    err = top[0]
    path = _path(err["loc"])
    loc = ".".join(str(p) for p in path) or "body"
    # every type failed at the field itself, on the same value (a dict's keys named like types do not)
    tags = [e["loc"][-1] for e in top
            if tuple(e["loc"][:-1]) == path and e["loc"][-1] not in path and e.get("input") is err.get("input")]
    kinds = list(dict.fromkeys(_kind(str(t)) for t in tags))
    if len(tags) == len(top) and len(kinds) > 1:
        return loc, f"must be {', '.join(kinds[:-1])} or {kinds[-1]} (got {_shown(err.get('input'))})"
    if err["type"] == "missing":  # its input is the object around it: nothing to show
        return loc, f"{err['msg']}"
    return loc, f"{err['msg']} (got {_shown(err.get('input'))})"


def parse(model: type[M], data: Any) -> M:
    """Validate `data` as `model`; a 400 names the first wrong field."""
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        loc, message = telling_error(exc.errors())
        raise BadRequest(f"field {loc!r}: {message}", param=loc) from None
    unknown = parsed.unknown_fields() if hasattr(parsed, "unknown_fields") else []
    if unknown:
        log.info("ignoring unknown fields %s in %s", unknown, model.__name__)
    return parsed


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work` in this task, cancelling it if the client goes away first."""
    watch = DisconnectWatch(request.scope, request.receive)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.left():
            raise EngineUnavailable("client disconnected") from None
        raise
    finally:
        watch.stop()


class _Indexed:
    """One stream as (0, item) pairs: merge's common case, without a task, a queue or an async generator."""

    def __init__(self, stream: AsyncIterator[T]) -> None:
        self.stream = stream

    def __aiter__(self) -> _Indexed:
        return self

    async def __anext__(self) -> tuple[int, Any]:
        return 0, await anext(self.stream)


def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators, yielding (index, item) as they come."""
    if len(streams) == 1:
        return _Indexed(streams[0])
    return _merge_many(streams)


async def _merge_many(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
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


def logprobs_setting(enabled: bool | None, top: int | None) -> int | None:
    """`logprobs: true` with `top_logprobs: 0-20` (OpenAI chat and Ollama alike) -> how many
    alternatives per token, or None when log probabilities are off."""
    if top is not None and not 0 <= top <= 20:
        raise BadRequest(f"top_logprobs must be 0 to 20, got {top}", param="top_logprobs")
    if not enabled:
        if top:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def logprob_entries(entries: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    """Tokens with their log probabilities and alternatives, in the shape OpenAI chat
    (`logprobs.content`) and Ollama (`logprobs`) share."""
    def one(t: TokenLogprob) -> dict[str, Any]:
        return {"token": t.token, "logprob": t.logprob, "bytes": t.bytes}

    return [{**one(t), "top_logprobs": [one(a) for a in t.top]} for t in entries]
