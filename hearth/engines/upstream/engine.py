"""An engine that forwards requests to another server (kind `openai` or `ollama`).

Requests go to the least busy healthy replica. A failure before the response
starts (refused connection, timeout, 5xx) is retried on another replica; once
chunks have reached the caller nothing is retried, the stream ends in a clean
error instead. Every upstream answers in the core types, so its models are
served through both of hearth's dialects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import orjson

from hearth.core import record
from hearth.core.errors import (
    BadRequest,
    ContextLengthExceeded,
    EngineUnavailable,
    HearthError,
    NotFound,
    RateLimited,
    UpstreamError,
)
from hearth.core.types import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    LoadedModel,
    ModelInfo,
)
from hearth.engines.upstream.generation import UpstreamGeneration
from hearth.engines.upstream.http import RETRYABLE, Pool, Response
from hearth.engines.upstream.managed import ManagedServer
from hearth.engines.upstream.ollama import OllamaWire
from hearth.engines.upstream.openai import OpenAIWire
from hearth.engines.upstream.replicas import Replica, ReplicaPool, describe
from hearth.engines.upstream.watchdog import Deadlines, Watchdog
from hearth.models.gguf_meta import GGUFError, model_facts, read_gguf
from hearth.settings import UpstreamEntry, UpstreamModel

log = logging.getLogger("hearth.upstream")
audit = logging.getLogger("hearth.cloud")
# how upstreams say a prompt does not fit (llama-server, vLLM, OpenAI, Ollama); clients look for the code
CONTEXT_FULL = re.compile(r"context (length|size|window)|maximum context", re.IGNORECASE)
# a 5xx that says the server cannot do what was asked (llama-server answers an image to a model
# without a projector with 500 "image input is not supported"): a fact about the request, not a fault
NOT_SUPPORTED = re.compile(r"\bnot supported\b|\bdoes not support\b", re.IGNORECASE)


class Secret:
    """An API key that never shows up in logs or reprs."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def _unset(obj: Any, name: str) -> Any:
    """The value a dataclass field has when the client did not send it (None, or {} for logit_bias)."""
    field = next(f for f in dataclasses.fields(obj) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


class UpstreamEngine:
    """Serves the models of one upstream (one or more replica URLs, or a managed child)."""

    passes_format_through = True  # the upstream enforces schemas; hearth validates the result
    supports_tools = True  # tools and tool calls pass through, translated between dialects
    supports_logprobs = True  # asked of the upstream, translated between dialects
    supports_thinking = True  # its models may think; their reasoning is passed on apart from the answer

    def __init__(self, name: str, cfg: UpstreamEntry, api_key: Secret | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.cloud = cfg.cloud
        self.wire: OpenAIWire | OllamaWire = OpenAIWire(cfg.cloud) if cfg.kind == "openai" else OllamaWire(cfg.cloud)
        self.pool = ReplicaPool(name, cfg.urls or ["http://127.0.0.1:0"])
        self.managed = ManagedServer(name, cfg.managed, self.wire.managed_ready_path, self._probe_url) \
            if cfg.managed else None
        self.discovery_error: str | None = None
        self._headers = {"Content-Type": "application/json"}
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key.reveal()}"
        self._drop = set(cfg.drop_params)
        self._dropped_logged: set[str] = set()
        self._models: dict[str, ModelInfo] = {}
        self._declared = [m if isinstance(m, UpstreamModel) else UpstreamModel(name=m) for m in cfg.models]
        self._refresher: asyncio.Future[None] | None = None  # re-lists discovered models
        self._listed_at = 0.0  # time.monotonic() of the last model-list request
        self._sized_at = 0.0  # start time of the managed child whose context sizes were read
        self._file_facts: dict[str, Any] = {}  # ModelInfo fields from a managed child's GGUF file
        self._http: Pool | None = None
        self.deadlines = Deadlines()  # one timer for the timeouts of all requests in flight

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Open the connection pool, learn the models, start health checks."""
        self._http = Pool(self.cfg.timeouts.connect)
        if self.managed is not None and self.managed.cfg.model_path is not None:
            self._file_facts = await asyncio.to_thread(gguf_facts, self.managed.cfg.model_path.expanduser())
        self._set_models(self._declared)
        if not self._declared:
            await self._discover()
            if not self.cloud:  # nothing goes to a cloud in the background: it is re-listed on demand
                self._refresher = asyncio.ensure_future(self._refresh_loop())
        if self.managed is None and not self.cloud:
            self.pool.start_health_checks(self._probe_replica, self.cfg.health_interval)
        elif self.cloud:  # no probes go to a cloud: an ejected replica gets a request again after a while
            self.pool.probation = self.cfg.health_interval

    async def close(self) -> None:
        """Stop health checks, a managed child, and the connection pool."""
        await self.pool.stop()
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        if self.managed is not None:
            await self.managed.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def http(self) -> Pool:
        if self._http is None:
            raise EngineUnavailable(f"upstream {self.name!r} is not started")
        return self._http

    async def _get(self, url: str, body: bytes | None = None) -> tuple[int, bytes]:
        """GET url (POST, with a body): status and body."""
        if body is None:
            resp = await self.http.request("GET", url, headers=self._headers)
        else:
            resp = await self.http.request("POST", url, body, self._headers)
        try:
            return resp.status, await resp.read()
        finally:
            resp.release()

    # -- models ----------------------------------------------------------------------

    def _model_id(self, upstream_name: str) -> str:
        """Public id: cloud models always carry `@upstream` so they never shadow local ones."""
        return f"{upstream_name}@{self.name}" if self.cloud else upstream_name

    def _set_models(self, models: list[UpstreamModel], facts: dict[str, dict[str, Any]] | None = None) -> None:
        table: dict[str, ModelInfo] = {}
        for m in models:
            caps = ["embedding"] if m.embedding else ["completion", "tools"]  # tools pass through
            info = ModelInfo(
                id=self._model_id(m.name), engine=self.name, context_length=m.context_length,
                owned_by=self.name, embedding_dimension=m.dimension, capabilities=caps,
                metadata={"upstream": self.name, "upstream_model": m.name, "cloud": self.cloud,
                          "kind": self.cfg.kind},
            )
            # what the upstream's list, or a managed child's GGUF, says of the model (for /api/show, tags)
            for key, value in {**(facts or {}).get(m.name, {}), **self._file_facts}.items():
                setattr(info, key, {**value, **info.metadata} if key == "metadata" else value)
            old = self._models.get(info.id)
            if old is not None and old.embedding_dimension and not info.embedding_dimension:
                info.embedding_dimension = old.embedding_dimension  # learned from an answer: kept
                if "embedding" not in info.capabilities:
                    info.capabilities = [*info.capabilities, "embedding"]
            table[info.id] = info
        self._models = table

    async def _discover(self) -> None:
        """Ask a replica for its model list (keeps the old list on failure)."""
        self._listed_at = time.monotonic()
        path = self.wire.models_path
        try:
            data = await self._get_json(path)
            listed, facts = self.wire.model_list(data), self.wire.model_facts(data)
        except (HearthError, AttributeError, TypeError, ValueError, *RETRYABLE) as exc:
            reason = exc.message if isinstance(exc, HearthError) else describe(exc)
            if reason != self.discovery_error:  # once per outage, not every retry
                log.warning("upstream %s: could not list models: %s", self.name, reason)
            self.discovery_error = reason
            return
        before = set(self._models)
        self.discovery_error = None
        self._set_models(listed, facts)
        if set(self._models) != before:
            log.info("upstream %s serves %d models", self.name, len(self._models))

    async def _refresh_loop(self) -> None:
        """Re-list the models every `refresh` seconds, every 5 s while the upstream does not answer."""
        while True:
            await asyncio.sleep(5.0 if self.discovery_error else self.cfg.refresh)
            await self._discover()

    async def list_models(self) -> list[ModelInfo]:
        """Declared models, or the last discovered ones: kept fresh by a background task, or for a
        cloud upstream re-listed here when stale (a client's listing, never hearth on its own)."""
        if self.cloud and not self._declared:
            age = time.monotonic() - self._listed_at
            if age > self.cfg.refresh or (self.discovery_error and age > 5.0):
                await self._discover()
        return list(self._models.values())

    def _upstream_model(self, model: ModelInfo) -> str:
        return str(model.metadata.get("upstream_model") or model.id)

    # -- HTTP ------------------------------------------------------------------------

    async def _base_url(self, replica: Replica) -> str:
        if self.managed is not None:
            replica.url = await self._ensure_managed()
        return replica.url

    async def _ensure_managed(self) -> str:
        """The managed child's URL, started if needed; a new child is asked its context size."""
        assert self.managed is not None
        url = await self.managed.ensure()
        if self._sized_at != self.managed.started_at:
            self._sized_at = self.managed.started_at
            await self._learn_contexts(url)
        return url

    async def _learn_contexts(self, url: str) -> None:
        """Fill in the context size of models declared without one, from the child's model list.

        It depends on the command line (`--ctx-size`, slots), so only the running child knows it;
        it is shown by `/api/ps`, `hearth ps` and `/v1/models`, so a failure here only logs.
        """
        try:
            async with asyncio.timeout(self.cfg.timeouts.connect):
                status, raw = await self._get(url + self.wire.models_path)
            listed = self.wire.model_list(orjson.loads(raw)) if status == 200 else []
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError, *RETRYABLE) as exc:
            log.info("upstream %s: could not read the context size: %s", self.name, describe(exc))
            return
        sizes = {m.name: m.context_length for m in listed if m.context_length}
        only = next(iter(sizes.values())) if len(sizes) == 1 else 0  # llama-server lists its GGUF path
        for declared in self._declared:
            info = self._models.get(self._model_id(declared.name))
            if info is not None and not declared.context_length:
                info.context_length = sizes.get(declared.name, only)

    async def _probe_url(self, url: str) -> bool:
        try:
            async with asyncio.timeout(self.cfg.timeouts.connect):
                status, _ = await self._get(url)
                return status == 200
        except (ValueError, *RETRYABLE):  # ValueError: a URL the client cannot use (settings catch most)
            return False

    async def _probe_replica(self, replica: Replica) -> None:
        async with asyncio.timeout(self.cfg.timeouts.connect):
            status, _ = await self._get(replica.url + self.wire.health_path)
        if status >= 500:
            raise UpstreamError(f"health check answered HTTP {status}")

    async def _get_json(self, path: str, body: bytes | None = None) -> Any:
        """GET (or POST `body` to) path on the first replica that answers it; the JSON answer."""
        tried: set[Replica] = set()
        errors: list[str] = []
        method = "GET" if body is None else "POST"
        while (replica := self.pool.pick(tried)) is not None:
            tried.add(replica)
            try:
                async with asyncio.timeout(self.cfg.timeouts.first_token):
                    status, raw = await self._get(replica.url + path, body)
                if status == 200:
                    return orjson.loads(raw)
                errors.append(f"{replica.url}: {method} {path} answered HTTP {status}")
            except (orjson.JSONDecodeError, *RETRYABLE) as exc:
                errors.append(f"{replica.url}: {describe(exc)}")
        raise UpstreamError("; ".join(errors))

    async def _open(self, path: str, body: bytes, dog: Watchdog) -> tuple[Replica, Response]:
        """POST to the least busy replica; fail over while nothing has been received."""
        tried: set[Replica] = set()
        errors: list[str] = []
        answered: list[tuple[Replica, str]] = []  # replicas that answered 5xx: alive, maybe the request's fault
        rec = record.current()  # its id goes along: vLLM takes it as its own request id, logs can be joined
        tag = b"X-Request-Id: %s\r\n" % rec.request_id.encode() if rec is not None and rec.request_id else b""
        while (replica := self.pool.pick(tried)) is not None:
            tried.add(replica)
            self.pool.acquire(replica)
            try:
                base = replica.url if self.managed is None else await self._base_url(replica)
                resp = await dog.within(dog.now() + self.cfg.timeouts.first_token,
                                        self.http.request("POST", base + path, body, self._headers, tag))
            except RETRYABLE as exc:
                self.pool.release(replica)
                reason = "no answer within timeouts.first_token" if isinstance(exc, TimeoutError) else describe(exc)
                self._fail(replica, reason, errors)
                continue
            except BaseException:
                self.pool.release(replica)
                raise
            if resp.status < 400:
                for bad, reason in answered:  # another replica could do it: those are at fault
                    self.pool.failed(bad, reason)
                return replica, resp
            self.pool.release(replica)
            message = await _error_text(resp)
            if resp.status >= 500 and not _unsupported(resp.status, message):  # no replica would do that
                reason = f"HTTP {resp.status}: {message}"
                log.warning("upstream %s: %s failed the request: %s", self.name, replica.url, reason)
                errors.append(f"{replica.url}: {reason}")
                answered.append((replica, reason))
                continue
            raise self._client_error(resp.status, message, resp.headers.get("retry-after"))
        if answered:
            # Every replica that was reached answered 5xx: llama-server does that for requests its chat
            # template rejects. Ejecting them all would let one bad request take the pool out of rotation.
            raise UpstreamError(f"upstream {self.name!r} failed the request: {'; '.join(errors)}; if every "
                                "replica says the same, the request is the cause (see the message)")
        raise EngineUnavailable(
            f"upstream {self.name!r} is unavailable: {'; '.join(errors) or 'no replicas'}; "
            "check that it is running and its urls in hearth.toml",
            retry_after=5,
        )

    def _fail(self, replica: Replica, reason: str, errors: list[str]) -> None:
        log.warning("upstream %s: %s failed before answering: %s", self.name, replica.url, reason)
        errors.append(f"{replica.url}: {reason}")
        self.pool.failed(replica, reason)

    def _client_error(self, status: int, message: str, retry_after: str | None) -> HearthError:
        text = f"upstream {self.name!r} refused the request (HTTP {status}): {message}"
        if status == 404:
            return NotFound(text)
        if status == 429:
            wait = retry_after or ""
            return RateLimited(text, retry_after=int(wait) if wait.isdigit() else 5)
        if status in (401, 403):
            return UpstreamError(text + "; check the upstream's api_key_env / api_key_file")
        if status == 400 and CONTEXT_FULL.search(message):
            return ContextLengthExceeded(text + "; shorten the prompt or lower max_tokens")
        if _unsupported(status, message):  # e.g. llama-server without --embeddings, or without an mmproj
            return BadRequest(f"upstream {self.name!r} does not support this request (HTTP {status}): {message}; "
                              "use a model on an engine that does, or change how that server is started",
                              code="not_supported")
        return BadRequest(text)

    def _dropper(self, model: str) -> Any:
        def drop(param: str) -> None:
            if param not in self._dropped_logged:
                self._dropped_logged.add(param)
                log.info("upstream %s does not support %r; dropping it (model %s; logged once)",
                         self.name, param, model)
        return drop

    # -- Engine protocol -------------------------------------------------------------

    async def generate(self, model: ModelInfo, req: GenerateRequest) -> UpstreamGeneration:
        """Send the request; returns once the upstream has started answering."""
        name = self._upstream_model(model)
        path, body = self.wire.generate_body(name, self._without_dropped(req), self._dropper(name))
        dog = Watchdog(self.deadlines)
        if self.managed is not None:
            self.managed.hold(req.keep_alive)  # before the child is started: nothing stops it meanwhile
        try:
            replica, resp = await self._open(path, body, dog)
        except BaseException as exc:
            dog.close()
            if self.managed is not None:
                self.managed.release()
            if isinstance(exc, HearthError):
                self._audit(model.id, 0, 0, f"error {exc.status}")  # refused or failed: it was still sent
            raise
        return UpstreamGeneration(self, replica, resp, req, name, dog)

    def _without_dropped(self, req: GenerateRequest) -> GenerateRequest:
        if not self._drop:
            return req
        s = req.sampling
        cleared: dict[str, Any] = {f: _unset(s, f) for f in self._drop
                                   if hasattr(s, f) and getattr(s, f) not in (None, {})}
        for f in cleared:
            self._dropper(req.model)(f)
        return dataclasses.replace(req, sampling=dataclasses.replace(s, **cleared)) if cleared else req

    async def embed(self, model: ModelInfo, req: EmbedRequest) -> EmbedResult:
        """Embed through the upstream; vectors are L2-normalised."""
        t0 = time.perf_counter_ns()
        path, body = self.wire.embed_body(self._upstream_model(model), req)
        dog = Watchdog(self.deadlines)
        if self.managed is not None:
            self.managed.hold(req.keep_alive)
        try:
            replica, resp = await self._open(path, body, dog)
            try:
                data = orjson.loads(await dog.within(dog.now() + self.cfg.timeouts.idle, resp.read()))
                vectors, tokens = self.wire.embed_result(data)
            except (UpstreamError, orjson.JSONDecodeError, *RETRYABLE) as exc:
                raise UpstreamError(f"upstream {self.name!r} sent a broken embeddings answer: {describe(exc)}") from None
            finally:
                resp.release()
                self.pool.release(replica)
        except HearthError as exc:
            self._audit(model.id, 0, 0, f"error {exc.status}")
            raise
        finally:
            dog.close()
            if self.managed is not None:
                self.managed.release()
        self.pool.succeeded(replica)
        self._audit(model.id, tokens, 0, "ok")  # sent and answered, even if refused below
        got = len(vectors[0]) if vectors else None
        if got is not None and req.dimensions is not None and got != req.dimensions:
            # llama-server and most OpenAI-compatible servers ignore `dimensions`: answering with
            # vectors of another size would break the client's store at insert time instead
            raise BadRequest(
                f"upstream {self.name!r} does not shorten embeddings: model {model.id!r} gives "
                f"{got}-dimensional vectors; drop `dimensions` or ask for {got}", param="dimensions")
        if got is not None and req.dimensions is None and model.embedding_dimension is None:
            model.embedding_dimension = got  # only an unshortened answer tells the native size
            if "embedding" not in model.capabilities:
                # discovery guesses from the name (bge-m3, all-minilm do not say "embed"): it embeds
                model.capabilities = [*model.capabilities, "embedding"]
        return EmbedResult(vectors=[_normalised(v) for v in vectors], prompt_tokens=tokens, model=model.id,
                           total_ns=time.perf_counter_ns() - t0)

    async def show(self, model: ModelInfo) -> None:
        """Fill in what an Ollama upstream's `/api/show` says of `model` (capabilities such as vision,
        its template, parameters, GGUF keys), for hearth's own /api/show. Asked once per model list;
        it only describes, so a failure leaves the model as it was listed.
        """
        if not isinstance(self.wire, OllamaWire) or model.metadata.get("shown") or self.managed is not None:
            return
        try:
            async with asyncio.timeout(self.cfg.timeouts.connect + 5):  # a description is not worth a long wait
                data = await self._get_json("/api/show", orjson.dumps({"model": self._upstream_model(model)}))
            facts = self.wire.show_facts(data)
        except (HearthError, AttributeError, TypeError, ValueError, *RETRYABLE) as exc:
            reason = exc.message if isinstance(exc, HearthError) else describe(exc)
            log.info("upstream %s: no /api/show for %s: %s", self.name, model.id, reason)
            return
        model.capabilities = facts.get("capabilities", model.capabilities)
        model.chat_template = facts.get("chat_template", model.chat_template)
        model.metadata = {**facts["metadata"], **model.metadata, "shown": True}

    def stats(self) -> dict[str, Any]:
        """For /metrics: requests in flight, and each replica's health (a managed child: running)."""
        replicas = self.pool.replicas
        m = self.managed
        running = m.running if m is not None else None
        return {
            "active_sequences": sum(r.outstanding for r in replicas),
            "replicas": [{"url": r.url, "healthy": r.healthy if running is None else running,
                          "outstanding": r.outstanding, "served": r.served,
                          "last_error": (m.last_error if m is not None else None) or r.last_error}
                         for r in replicas],
        }

    def status(self) -> dict[str, Any]:
        """For `/admin/upstreams` and `hearth upstreams`: what it is, what it serves, how its replicas are."""
        return {"name": self.name, "kind": self.cfg.kind, "cloud": self.cloud, "managed": self.managed is not None,
                "models": sorted(self._models), "discovery_error": self.discovery_error, **self.stats()}

    async def ready(self) -> bool:
        """True once started: a down upstream makes its models answer 503, not hearth."""
        return self._http is not None

    async def loaded(self) -> list[LoadedModel]:
        """What is in memory (for /api/ps and `hearth ps`): a running managed child's models, or
        what an Ollama upstream's replicas say they hold."""
        m = self.managed
        if m is None and isinstance(self.wire, OllamaWire):
            return await self._ollama_running(self.wire)
        if m is None or not m.running:
            return []
        return [LoadedModel(info.id, info.size_bytes, info.context_length, m.expires_at())  # size: of its GGUF
                for info in self._models.values()]

    async def _ollama_running(self, wire: OllamaWire) -> list[LoadedModel]:
        """Each replica's `/api/ps`, asked at once and briefly (a listing must not wait on a dead box)."""
        async def one(url: str) -> list[tuple[str, int, int, float]]:
            try:
                async with asyncio.timeout(min(self.cfg.timeouts.connect, 2.0)):
                    status, raw = await self._get(url + "/api/ps")
                return wire.running(orjson.loads(raw)) if status == 200 else []
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError, *RETRYABLE):
                return []  # a replica that does not answer holds nothing we can show

        seen: dict[str, LoadedModel] = {}
        for listed in await asyncio.gather(*(one(r.url) for r in self.pool.replicas)):
            for name, size, ctx, expires in listed:
                model_id = self._model_id(name)
                if model_id in self._models:
                    seen.setdefault(model_id, LoadedModel(model_id, size, ctx, expires or None))
        return list(seen.values())

    async def load(self, model: ModelInfo, keep_alive: float | None) -> float:
        """Start a managed child now, or ask an Ollama upstream to load the model (with that
        keep_alive); OpenAI-compatible servers hold their models themselves."""
        t0 = time.perf_counter()
        if self.managed is not None:
            self.managed.keep(keep_alive)
            await self._ensure_managed()
        elif isinstance(self.wire, OllamaWire):
            await self._get_json("/api/generate", self.wire.load_body(self._upstream_model(model), keep_alive))
        return time.perf_counter() - t0

    async def unload(self, model: ModelInfo) -> None:
        """Stop a managed child now, or have every replica of an Ollama upstream unload the model."""
        if self.managed is not None:
            await self.managed.stop_when_idle()  # other clients' requests finish first
        elif isinstance(self.wire, OllamaWire):
            body = self.wire.load_body(self._upstream_model(model), 0)
            await asyncio.gather(*(self._unload_at(r.url, body) for r in self.pool.replicas))

    async def _unload_at(self, url: str, body: bytes) -> None:
        try:
            async with asyncio.timeout(self.cfg.timeouts.connect + 5):
                status, _ = await self._get(url + "/api/generate", body)
        except RETRYABLE as exc:
            log.info("upstream %s: %s did not take the unload: %s", self.name, url, describe(exc))
            return
        if status != 200:
            log.info("upstream %s: %s answered the unload with HTTP %d", self.name, url, status)

    def _audit(self, model: str, prompt_tokens: int, completion_tokens: int, outcome: str) -> None:
        """One line per cloud request: who, where, how much; never content."""
        if not self.cloud:
            return
        rec = record.current()
        audit.info("cloud request upstream=%s model=%s caller=%s prompt_tokens=%d completion_tokens=%d outcome=%s",
                   self.name, model, (rec.key_name if rec else None) or "-", prompt_tokens, completion_tokens, outcome)


async def _error_text(resp: Response) -> str:
    """The message of an upstream's error answer, short."""
    try:
        raw = await resp.read()
    except RETRYABLE as exc:
        return describe(exc)
    finally:
        resp.release()
    try:
        data = orjson.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message", err) if isinstance(err, dict) else err
        return str(msg)[:300]
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace").strip()[:300] or "(empty body)"


def _unsupported(status: int, message: str) -> bool:
    """The server says it cannot do this kind of request: the client's 400, not a replica's fault."""
    return status == 501 or (status >= 500 and NOT_SUPPORTED.search(message) is not None)


def gguf_facts(path: Path) -> dict[str, Any]:
    """ModelInfo fields read from a managed child's model file ({} unless it is a readable GGUF)."""
    if not path.is_file():
        return {}  # e.g. a Hugging Face directory for `vllm serve`
    try:
        meta = read_gguf(path)
    except (GGUFError, OSError) as exc:
        log.info("%s is not a GGUF file hearth can read (%s); its details stay unknown", path, exc)
        return {}
    stat = path.stat()
    return {**model_facts(meta), "path": str(path), "size_bytes": stat.st_size, "created": int(stat.st_mtime)}


def _normalised(vec: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]
