"""Keys, roles, model patterns, quotas, bounds and usage recording: one ASGI middleware.

A pure ASGI middleware (it never buffers a response, so streams stay streams):

1. Header size over `max_header_bytes` -> 431.
2. Opens the request's `RequestRecord` (the serving code fills in model and tokens).
3. Auth. With no key ever created, no key is needed (the server only listens on
   loopback then). Once a key exists, every request needs a valid one
   (`Authorization: Bearer` or `x-api-key`), unless `loopback_needs_key = false`
   and the client is on loopback. 401s never say whether a key or name exists.
4. Roles: /admin/*, /metrics and Ollama's model management need an admin key.
5. Model patterns and cloud opt-in: the JSON body's `model` (or `name`) is read
   (bounded, then replayed to the app untouched) only for keys that are
   restricted; a model outside the key's patterns is a 403 naming it.
6. `--rpm` / `--tokens-per-day` -> 429 with Retry-After.
7. Stream idle bound: a response that goes silent for `stream_idle_timeout`
   ends with an error event.
8. Before the last body byte leaves, the usage row is written (appended to the
   usage journal, see store/usage_journal.py: a SIGKILL right after a
   response loses nothing) and the metrics are updated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from itertools import chain, count
from pathlib import Path
from typing import Any

import orjson
from starlette.routing import Match

from hearth.api.idle import IdleSweeper
from hearth.api.metrics import Metrics
from hearth.api.quota import Limiter
from hearth.core.errors import (
    BadRequest,
    Forbidden,
    HearthError,
    PayloadTooLarge,
    Unauthorized,
    internal_error,
)
from hearth.core.record import RequestRecord, close_record, open_record
from hearth.core.router import normalize
from hearth.core.types import ModelInfo
from hearth.settings import Settings
from hearth.store.db import SQLiteDatabase, open_database
from hearth.store.keys import Key, KeyStore
from hearth.store.usage import UsageRow, UsageStore
from hearth.store.usage_journal import UsageJournal

log = logging.getLogger("hearth.auth")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/", "/health", "/ready", "/favicon.ico"})
OPEN_PREFIXES = ("/ui/",)
ADMIN_PATHS = frozenset({"/metrics", "/api/pull", "/api/delete", "/api/create", "/api/copy", "/api/push"})
ADMIN_PREFIXES = ("/admin/",)
NAME_PATHS = frozenset({"/api/show", "/api/pull", "/api/delete", "/api/push"})  # `model`, or older `name`
LOOPBACK_CLIENTS = frozenset({"127.0.0.1", "::1", "localhost", "testclient"})
NO_RECORD_PATHS = frozenset({"/metrics"})
STREAM_TYPES = (b"text/event-stream", b"application/x-ndjson")
MISSING_KEY = ("this server needs an API key: send `Authorization: Bearer hk-...` or `x-api-key: hk-...`; "
               "an admin creates one with `hearth keys create NAME`")
INVALID_KEY = ("the API key is not valid (unknown, revoked or expired); check it, or ask an admin for a new one "
               "(`hearth keys list` shows which keys exist)")


REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")  # a client's X-Request-Id: visible ASCII, bounded


def scan_headers(headers: list[tuple[bytes, bytes]]) -> tuple[int, str | None]:
    """The headers' total size (names and values) and the key they present (the first that carries
    one). Built-ins do the work for the usual request: no Python loop over the headers."""
    size = len(b"".join(chain.from_iterable(headers)))
    first = dict(reversed(headers))  # each name's first value
    auth, api_key = first.get(b"authorization"), first.get(b"x-api-key")
    if auth is None and api_key is None:
        return size, None
    if api_key is None and len(first) == len(headers):  # no name twice: one Authorization header
        return size, _bearer(auth)  # type: ignore[arg-type]
    for name, value in headers:  # several candidates: the first that carries a key, as sent
        if name == b"authorization":
            secret = _bearer(value)
            if secret is not None:
                return size, secret
        elif name == b"x-api-key" and value.strip():
            return size, value.decode("latin-1").strip()
    return size, None


def _bearer(value: bytes) -> str | None:
    """The token of `Authorization: Bearer <token>` (None for other schemes or none)."""
    scheme, _, token = value.decode("latin-1").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def dialect_of(path: str) -> str:
    """Which API a path belongs to (for usage rows and error envelopes)."""
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith("/v1/"):
        return "openai"
    return "admin" if path.startswith("/admin/") or path == "/metrics" else "other"


def error_body(path: str, err: HearthError) -> bytes:
    """The error in the envelope of the path's dialect."""
    if path.startswith("/api/"):
        return orjson.dumps({"error": err.message})
    from hearth.api.openai.convert import error_body as openai_error

    return orjson.dumps(openai_error(err))


class HeadersTooLarge(HearthError):
    """The request's headers are over `max_header_bytes` (431): the client's doing, not the server's."""

    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


def needs_admin(path: str) -> bool:
    """Paths only admin keys may use."""
    return path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES)


class Security:
    """The database-backed state behind the middleware; lives on `app.state.hearth.extras['security']`."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time,
                 db: SQLiteDatabase | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.db = db or open_database(settings.db_path, background_checkpoints=True)
        # A request's usage row is one append to the journal (folded in batches
        # on a thread), not a commit on the request path; None if another live
        # server owns this database's journal or the database was given.
        self.journal = UsageJournal.claim(Path(settings.db_path)) if db is None else None
        self.keys = KeyStore(self.db, clock)
        self.usage = UsageStore(self.db)
        self.limiter = Limiter(settings.rate_window, settings.token_window, clock)
        self.limiter.restore(self.usage.recent(clock() - max(settings.rate_window, settings.token_window)))
        self.metrics = Metrics()
        self.idle = IdleSweeper(settings.stream_idle_timeout) if settings.stream_idle_timeout > 0 else None
        self.cloud_engines = frozenset(n for n, up in (getattr(settings, "upstreams", None) or {}).items()
                                       if getattr(up, "cloud", False))
        self._keys_on = False
        self._ids = count(1)
        self._id_prefix = "req_" + os.urandom(6).hex()  # one random per server, a counter per request
        self._path_facts: dict[str, tuple[str, str, bool]] = {}
        self._touched: dict[int, float] = {}

    def request_id(self, headers: list[tuple[bytes, bytes]]) -> str:
        """The client's X-Request-Id if it sent a usable one (to follow a request across servers),
        else a new one."""
        for name, value in headers:
            if name == b"x-request-id" and REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
        return f"{self._id_prefix}{next(self._ids):x}"

    def keys_on(self) -> bool:
        """True once any key exists (the CLI may add one while the server runs; a stat tells)."""
        if not self._keys_on:
            self._keys_on = self.keys.any_keys()
        return self._keys_on

    def identify(self, scope: Scope, secret: str | None) -> Key | None:
        """The calling key (None = keyless owner), or raise 401; `secret` as `scan_headers` found it."""
        client = scope.get("client")
        local = client is not None and client[0] in LOOPBACK_CLIENTS
        if secret is None and local and not self.settings.loopback_needs_key:
            return None  # the owner on this machine, whether keys exist or not
        if not self.keys_on():
            if client and not local:
                raise Unauthorized("this server has no API keys yet, so it answers only on this machine; "
                                   "create an admin key with `hearth keys create NAME --role admin`")
            return None
        if secret is None:
            raise Unauthorized(MISSING_KEY)
        key = self.keys.verify(secret)
        if key is None:
            raise Unauthorized(INVALID_KEY)
        return key

    def admit(self, scope: Scope, key: Key | None) -> None:
        """Raise 403 for a path above the key's role, 429 over its limits (after `identify`, so the
        refusal is recorded against the key)."""
        if key is None:
            return
        # charged first, as every refusal after admission is (and as the restart restores them: only 429s
        # are left out there)
        self.limiter.admit(key.id, key.rpm, key.tokens_per_day)
        if needs_admin(scope["path"]) and key.role != "admin":
            raise Forbidden(f"{scope['path']} needs an admin key; this key's role is {key.role!r}")

    def path_facts(self, scope: Scope) -> tuple[str, str, bool]:
        """The route template a path matched (bounded cardinality for metrics and usage), its dialect,
        and whether it is open (no key, no record): one dict lookup per request."""
        path = scope["path"]
        facts = self._path_facts.get(path)
        if facts is None:
            label = "other"
            for route in getattr(scope.get("app"), "routes", ()):
                match, _ = route.matches(scope)
                if match != Match.NONE:
                    label = getattr(route, "path", "other")
                    break
            facts = (label, dialect_of(path), path in OPEN_PATHS or path.startswith(OPEN_PREFIXES))
            if len(self._path_facts) < 4096:
                self._path_facts[path] = facts
        return facts

    async def check_model(self, scope: Scope, receive: Receive, key: Key | None) -> Receive:
        """403 if a restricted key names a model outside its patterns (or a cloud model without opt-in)."""
        if key is None:
            return receive
        cloud_check = bool(self.cloud_engines) and not key.allow_cloud
        if key.unrestricted and not cloud_check:
            return receive
        name, receive = await self._model_name(scope, receive)
        if name is _NO_MODEL:
            return receive
        state = scope["app"].state.hearth
        wanted = name or state.router.default_model
        spellings = model_spellings(wanted, state.router.aliases)
        if not key.allows_model(spellings):
            raise Forbidden(f"this key may not use model {wanted!r} (allowed: {', '.join(key.models)}); "
                            "ask an admin to widen its --models", param="model", code="model_not_allowed")
        if cloud_check:
            _, info = await state.router.resolve(wanted)
            if info.metadata.get("cloud") or info.engine in self.cloud_engines:
                raise Forbidden(f"model {wanted!r} runs on cloud upstream {info.engine!r} and this key is not "
                                "allowed to send prompts off this machine; an admin can recreate the key with "
                                "--allow-cloud", param="model", code="cloud_not_allowed")
        return receive

    async def _model_name(self, scope: Scope, receive: Receive) -> tuple[Any, Receive]:
        """The model a request names: from the path (/v1/models/X) or the JSON body."""
        path = scope["path"]
        if scope["method"] in ("GET", "HEAD"):  # Starlette answers HEAD on every GET route
            if path.startswith("/v1/models/"):
                return path[len("/v1/models/"):], receive
            return _NO_MODEL, receive
        if scope["method"] != "POST" or not path.startswith(("/v1/", "/api/")):
            return _NO_MODEL, receive
        body, receive = await read_body(receive, self.settings.max_body_bytes)
        try:
            data = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            return _NO_MODEL, receive  # the route answers 400 for bad JSON
        if not isinstance(data, dict):
            return _NO_MODEL, receive
        # exactly the field the route will use: only Ollama's show (and the admin-only store routes)
        # fall back to `name`; elsewhere a `name` beside a missing `model` must not stand for the model
        # (the route would serve the default model while the check looked at `name`)
        name = data.get("model")
        if not name and path in NAME_PATHS:
            name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise BadRequest(f"field 'model' must be a string, got {type(name).__name__}", param="model")
        return name, receive

    def persist(self, rec: RequestRecord, key: Key | None) -> None:
        """Commit the usage row, count tokens toward quotas and update metrics."""
        t = self.clock()
        tokens = rec.prompt_tokens + rec.completion_tokens
        ttft_ms, duration_ms = rec.ttft_ms, rec.duration_ms
        if rec.route not in NO_RECORD_PATHS:
            row = UsageRow(
                ts=t, key_id=key.id if key else None, key_name=key.name if key else None, model=rec.model,
                engine=rec.engine, cloud=bool(getattr(rec, "cloud", False)) or rec.engine in self.cloud_engines,
                dialect=rec.dialect, route=rec.route, status=rec.status, prompt_tokens=rec.prompt_tokens,
                completion_tokens=rec.completion_tokens, cached_tokens=rec.cached_tokens, ttft_ms=ttft_ms,
                duration_ms=duration_ms)
            touch = key.id if key is not None and t - self._touched.get(key.id, 0.0) >= 1.0 else None
            if touch is not None:  # last-used, to the second
                self._touched[touch] = t
            if self.journal is not None:
                self.journal.append(row)
                if touch is not None:
                    self.keys.touch(touch, t)
            elif touch is not None:
                with self.db.transaction():
                    self.usage.record(row)
                    self.keys.touch(touch, t)
            else:
                self.usage.record(row)  # one statement: committed on its own
        if key is not None and tokens:
            self.limiter.add_tokens(key.id, tokens, t)
        self.metrics.observe(rec, rec.route, ttft_ms, duration_ms)

    async def settle_usage(self) -> None:
        """Fold the journal, so that a summary read next counts every finished request."""
        if self.journal is not None:
            await asyncio.to_thread(self.journal.fold)

    def close(self) -> None:
        """Fold the journal and close the database."""
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self.keys.close()
        self.db.close()


_NO_MODEL = object()


def visible_models(scope: Scope, models: list[ModelInfo]) -> list[ModelInfo]:
    """The models the calling key may use: model lists show a restricted key only those."""
    key: Key | None = scope.get("hearth.key")
    if key is None:
        return models
    aliases = scope["app"].state.hearth.router.aliases
    return [m for m in models
            if key.allows_model(model_spellings(m.id, aliases)) and (key.allow_cloud or not m.metadata.get("cloud"))]


def model_spellings(name: str, aliases: dict[str, str]) -> list[str]:
    """A model's names a pattern may match: as asked, with/without `:latest`, an alias's target, and the
    aliases that point at it (a key allowed `embed` may use, and sees, the model `embed` names)."""
    names = [name, normalize(name), name.removesuffix(":latest")]
    target = aliases.get(name) or aliases.get(name.removesuffix(":latest"))
    if target:
        names += [target, normalize(target), target.removesuffix(":latest")]
    wanted = normalize(target or name)
    names += [alias for alias, to in aliases.items() if normalize(to) == wanted]
    return names


async def read_body(receive: Receive, limit: int) -> tuple[bytes, Receive]:
    """Read the whole request body (at most `limit` bytes) and a `receive` that replays it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes (setting max_body_bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


class Exchange:
    """One request's way out: status, idle bound, and the usage commit before the last byte."""

    def __init__(self, security: Security, scope: Scope, send: Send, rec: RequestRecord) -> None:
        self.security = security
        self.scope = scope
        self.raw_send = send
        self.rec = rec
        self.key: Key | None = None
        self.persisted = False
        self.streaming = False
        self.idle_fired = False
        self.watched = False  # the idle sweeper bounds this stream
        self.last = 0.0  # time.monotonic() of the last piece sent (for the sweeper)
        self.cancelled_task: asyncio.Task[Any] | None = None

    async def send(self, message: Message) -> None:
        """The `send` the app sees."""
        kind = message["type"]
        if self.idle_fired:  # the stream was cut; what the app still sends is dropped
            return
        if kind == "http.response.start":
            self.rec.status = message["status"]
            self._start_idle(message)
            message = {**message, "headers": [*message.get("headers", ()),
                                              (b"x-request-id", self.rec.request_id.encode())]}
        elif kind == "http.response.body":
            if not message.get("more_body", False):
                self.finish()  # stops the idle bound too
            elif self.watched:
                self.last = time.monotonic()
        await self.raw_send(message)

    def _start_idle(self, message: Message) -> None:
        for name, value in message.get("headers") or ():
            if name == b"content-type":
                self.streaming = value.startswith(STREAM_TYPES)
                break
        sweeper = self.security.idle
        if self.streaming and sweeper is not None:
            self.cancelled_task = asyncio.current_task()
            self.watched = True
            sweeper.watch(self)

    def idle_out(self) -> None:
        """The sweeper's call: silent too long, the task sending the body is cancelled."""
        self.watched = False
        self.idle_fired = True
        if self.cancelled_task is not None:
            self.cancelled_task.cancel()

    def _stop_idle(self) -> None:
        if self.watched:
            self.watched = False
            sweeper = self.security.idle
            if sweeper is not None:
                sweeper.forget(self)

    async def end_idle_stream(self) -> None:
        """After an idle cut: an error event in the stream's format, then the end of the body."""
        idle = self.security.settings.stream_idle_timeout
        err = HearthError(f"the response was silent for {idle:g} s (setting stream_idle_timeout); "
                          "the request was stopped, retry it", code="stream_idle_timeout")
        self.rec.status = 504
        body = error_body(self.scope["path"], err)
        if self.streaming:
            chunk = body + b"\n" if self.scope["path"].startswith("/api/") else b"data: " + body + b"\n\n"
        else:
            chunk = b""
        self.finish()
        await self.raw_send({"type": "http.response.body", "body": chunk, "more_body": False})

    async def send_error(self, err: HearthError) -> None:
        """Answer with `err` in the path's envelope (the app is never called)."""
        headers = [(b"content-type", b"application/json")]
        if err.retry_after is not None:
            headers.append((b"retry-after", str(err.retry_after).encode()))
        if err.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="hearth"'))
        body = error_body(self.scope["path"], err)
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({"type": "http.response.start", "status": err.status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def finish(self) -> None:
        """Persist once (called before the last byte, or at the end if it never went out)."""
        if self.persisted:
            return
        self.persisted = True
        self._stop_idle()
        self.rec.finished_ns = time.perf_counter_ns()
        if not self.rec.status:  # the app raised before answering: the error handler sends a 500
            self.rec.status = 500
        if self.rec.status == 401:  # no key to charge: count it, store nothing (no DB growth from strangers)
            self.security.metrics.observe(self.rec, self.rec.route)
            return
        try:
            self.security.persist(self.rec, self.key)
        except Exception:  # the answer is still delivered; the log says the row is missing
            log.exception("could not record usage of %s %s", self.scope["method"], self.scope["path"])


class SecurityMiddleware:
    """The ASGI middleware; see the module docstring."""

    def __init__(self, app: ASGIApp, security: Security) -> None:
        self.app = app
        self.security = security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sec = self.security
        label, dialect, is_open = sec.path_facts(scope)
        rec, token = open_record(label, dialect)
        rec.request_id = sec.request_id(scope["headers"])
        exchange = Exchange(sec, scope, send, rec)
        try:
            await self._serve(scope, receive, exchange, is_open)
        finally:
            close_record(token)

    async def _serve(self, scope: Scope, receive: Receive, exchange: Exchange, is_open: bool) -> None:
        sec = self.security
        try:
            header_bytes, secret = scan_headers(scope["headers"])
            if header_bytes > sec.settings.max_header_bytes:
                raise HeadersTooLarge(f"request headers are {header_bytes} bytes; the limit is "
                                      f"{sec.settings.max_header_bytes} (setting max_header_bytes)")
            if is_open:
                await self.app(scope, receive, send_only(exchange))
                return
            exchange.key = sec.identify(scope, secret)
            scope["hearth.key"] = exchange.key  # for the model lists (visible_models)
            exchange.rec.key_name = exchange.key.name if exchange.key else None
            sec.admit(scope, exchange.key)
            receive = await sec.check_model(scope, receive, exchange.key)
        except HearthError as err:
            await exchange.send_error(err)
            return
        except Exception as exc:  # a bug or a database error here: still an answer in the dialect's envelope
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            await exchange.send_error(internal_error(exc))
            return
        try:
            try:
                await self.app(scope, receive, exchange.send)
            except asyncio.CancelledError:
                # the idle bound cancels the task that sends the body: this one (ASGI 2.4) or a
                # child of the response's task group (2.3), whose cancellation ends the app normally
                task = asyncio.current_task()
                if not exchange.idle_fired or task is not exchange.cancelled_task or task is None:
                    raise
                task.uncancel()
            if exchange.idle_fired and not exchange.persisted:
                await exchange.end_idle_stream()
        finally:
            exchange.finish()


def send_only(exchange: Exchange) -> Send:
    """For open paths: pass messages through without usage or metrics."""
    exchange.persisted = True
    return exchange.raw_send


def install(settings: Settings, state: Any) -> tuple[list[Any], list[Any]]:
    """Routes (/admin/*, /metrics) and middleware (CORS if configured, then security) for `create_app`."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    from hearth.api import admin

    security = Security(settings)
    state.extras["security"] = security
    middleware = []
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                                     allow_headers=["*"], expose_headers=["Retry-After", "X-Request-Id"]))
    middleware.append(Middleware(SecurityMiddleware, security=security))
    return admin.routes(), middleware
