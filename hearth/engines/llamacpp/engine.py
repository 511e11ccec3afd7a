"""The in-box engine, gateway side: models -> worker processes, requests -> workers."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hearth.core import record
from hearth.core.errors import (
    BadRequest,
    ContextLengthExceeded,
    EngineUnavailable,
    HearthError,
    NotFound,
    RateLimited,
)
from hearth.core.types import (
    Chunk,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    LoadedModel,
    ModelInfo,
    TokenLogprob,
    Usage,
)
from hearth.engines.llamacpp import tool_calls
from hearth.engines.llamacpp.chat_format import ChatFormatter
from hearth.engines.llamacpp.client import WorkerArgs, WorkerClient
from hearth.engines.llamacpp.native_spec import sampler_spec
from hearth.engines.llamacpp.tool_stream import ToolCallGeneration
from hearth.models.bundled import BUNDLED_NAME, ensure_bundled
from hearth.models.gguf_meta import GGUFError, model_facts, read_gguf
from hearth.settings import Settings

log = logging.getLogger("hearth.engine.llamacpp")


def physical_cores() -> int:
    """Physical cores (llama.cpp runs best with one thread per core)."""
    seen: set[tuple[str, str]] = set()
    phys = core = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif not key and core:
                    seen.add((phys, core))
                    core = ""
        if core:
            seen.add((phys, core))
    except OSError:
        pass
    return len(seen) or os.cpu_count() or 1


@dataclass
class ServedModel:
    """A GGUF this engine can serve, and its worker when loaded."""

    info: ModelInfo
    path: Path
    worker: WorkerClient | None = None
    formatter: ChatFormatter | None = None
    expires_at: float | None = None
    lock: asyncio.Lock | None = None
    unload_pending: bool = False  # asked to unload while requests ran: they must not extend keep-alive


class LlamaGeneration:
    """Chunks from a worker for one request; closing early cancels it."""

    def __init__(self, worker: WorkerClient, rid: str, box: asyncio.Queue[tuple[Any, ...]],
                 prompt_tokens: int, load_ns: int, t0: int, on_end: Any) -> None:
        self.worker = worker
        self.rid = rid
        self.box = box
        self.prompt_tokens = prompt_tokens
        self.load_ns = load_ns
        self.t0 = t0
        self.done = False
        self.on_end = on_end

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._run()

    async def _run(self) -> AsyncIterator[Chunk]:
        while not self.done:
            msg = await self.box.get()
            kind = msg[0]
            if kind == "text":
                yield Chunk(text=msg[2], logprobs=tuple(map(_logprob, msg[3])) if len(msg) > 3 else ())
            elif kind == "done":
                self._end()
                u = msg[3]
                total = time.perf_counter_ns() - self.t0
                usage = Usage(
                    prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                    cached_tokens=u["cached_tokens"], prompt_ns=u["prompt_ns"],
                    generate_ns=u["generate_ns"], load_ns=self.load_ns, total_ns=total,
                )
                yield Chunk(finish_reason=msg[2], usage=usage)
            elif kind == "dead":
                self._end()
                raise EngineUnavailable(
                    f"the engine worker for {self.worker.name} stopped (exit {msg[2]}) during this request; "
                    "it is being restarted, retry the request", retry_after=1)
            elif kind == "error":
                self._end()
                raise EngineUnavailable(f"engine error: {msg[3]}")

    def _end(self) -> None:
        if not self.done:
            self.done = True
            self.worker.close_box(self.rid)
            self.on_end()

    async def aclose(self) -> None:
        if not self.done:
            try:
                self.worker.send("cancel", self.rid)
            except HearthError:
                pass  # worker already gone: nothing left to cancel
            self._end()


class LlamaCppEngine:
    """llama.cpp in worker processes, one per loaded model, batching inside."""

    name = "local"
    supports_tools = True  # through the model's template, or hearth's tool prompt (tool_calls.py)
    supports_logprobs = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.threads = settings.threads or physical_cores()
        self.served: dict[str, ServedModel] = {}
        self.reaper: asyncio.Task[None] | None = None
        self.restarts = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def capacity(self) -> int:
        """Generations one model holds at once, running and queued (a request needing more is a 400)."""
        return self.settings.slots + self.settings.max_queue

    # -- model table ------------------------------------------------------------
    def _register(self, name: str, path: Path, dims: list[int]) -> None:
        info = self._info(name, path, dims)
        if info is not None:
            self.served[name] = ServedModel(info=info, path=path, lock=asyncio.Lock())

    def _info(self, name: str, path: Path, dims: list[int]) -> ModelInfo | None:
        try:
            meta = read_gguf(path)
        except GGUFError as exc:
            log.error("skipping model %s: %s", name, exc)
            return None
        ctx = min(self.settings.ctx_per_slot, meta.context_length or self.settings.ctx_per_slot)
        info = ModelInfo(
            id=name, engine=self.name, context_length=ctx,
            created=int(path.stat().st_mtime), owned_by="hearth",
            embedding_dimension=meta.embedding_length or None,
            embedding_dimensions=sorted(set(dims) | {meta.embedding_length}) if dims else [],
            capabilities=["completion", "embedding", "tools"],
            size_bytes=path.stat().st_size, path=str(path),
            digest=path.name.removeprefix("sha256-") if path.name.startswith("sha256-") else "",
            **model_facts(meta),
        )
        return info

    async def start(self) -> None:
        path = await asyncio.to_thread(ensure_bundled, self.settings.models_dir)
        self._register(BUNDLED_NAME, path, [])
        for name, entry in self.settings.models.items():
            full = name if ":" in name else f"{name}:latest"
            self._register(full, entry.path.expanduser(), entry.embedding_dimensions)
        self.refresh_store()
        default = self.served.get(self.settings.default_model) or self.served.get(
            f"{self.settings.default_model}:latest")
        if default is not None:
            await self._worker(default, None)
        self.reaper = asyncio.ensure_future(self._reap())

    def refresh_store(self) -> None:
        """Serve every model in the on-disk store; drop unloaded ones that left it (after pull/rm/cp)."""
        from hearth.models.serving import store_models

        found = store_models(self.settings.models_dir)
        for name, path in found.items():
            sm = self.served.get(name)
            if sm is None:
                self._register(name, path, [])
                if name in self.served:
                    self.served[name].info.metadata["hearth.store"] = True
            elif sm.path != path and (sm.info.metadata.get("hearth.store") or name == BUNDLED_NAME):
                # pulled again or copied over: serve the new blob (a loaded worker reloads when idle);
                # the bundled entry stays unmarked, so leaving the store does not drop the default model
                info = self._info(name, path, [])
                if info is not None:
                    if sm.info.metadata.get("hearth.store"):
                        info.metadata["hearth.store"] = True
                    sm.info, sm.path = info, path
        # unloaded ones that left the store, or whose file is gone (a forced rm of the bundled model)
        for name in [n for n, sm in self.served.items() if sm.worker is None and (
                (sm.info.metadata.get("hearth.store") and n not in found) or not sm.path.exists())]:
            del self.served[name]

    async def close(self) -> None:
        if self.reaper:
            self.reaper.cancel()
        for sm in self.served.values():
            if sm.worker:
                await sm.worker.stop()
                sm.worker = None

    async def list_models(self) -> list[ModelInfo]:
        return [sm.info for sm in self.served.values()]

    def _served(self, model: ModelInfo) -> ServedModel:
        sm = self.served.get(model.id)
        if sm is None:
            raise NotFound(f"model {model.id!r} is not served by the in-box engine")
        return sm

    # -- workers and keep-alive ------------------------------------------------
    def _keep(self, sm: ServedModel, keep_alive: float | None) -> None:
        if keep_alive is None and sm.unload_pending:
            return  # `ollama stop` or keep_alive 0 came in meanwhile: unload once idle, as asked
        sm.unload_pending = False
        ka = self.settings.keep_alive if keep_alive is None else keep_alive
        sm.expires_at = None if ka < 0 else time.time() + ka

    async def _worker(self, sm: ServedModel, keep_alive: float | None) -> tuple[WorkerClient, int]:
        """The model's live worker (starting one if needed) and load time in ns."""
        assert sm.lock is not None
        async with sm.lock:
            if (sm.worker is None or not sm.worker.alive) and not sm.path.exists():
                self.refresh_store()  # the store changed under us (a pull or cp from the CLI): follow it
                if not sm.path.exists():
                    raise NotFound(f"the file of model {sm.info.id!r} is gone ({sm.path}); pull or import "
                                   "it again", param="model")
            load_ns = 0
            stale = sm.worker is not None and sm.worker.args.model_path != str(sm.path) and not sm.worker.outstanding
            if sm.worker is None or not sm.worker.alive or stale:
                if sm.worker is not None:
                    await sm.worker.stop()
                t0 = time.perf_counter_ns()
                s = self.settings
                from hearth.models.serving import ensure_fits

                await asyncio.to_thread(ensure_fits, sm.info.id, sm.path, sm.info.context_length, s.slots,
                                        max(s.batch_size, s.slots))
                worker = WorkerClient(sm.info.id, WorkerArgs(
                    str(sm.path), s.slots, sm.info.context_length, s.batch_size, self.threads,
                    prefill_chunk=s.prefill_chunk, deterministic=s.deterministic))
                info = await worker.start()
                worker.on_death = lambda: self._restart_soon(sm)
                sm.worker = worker
                sm.formatter = ChatFormatter(info.get("chat_template"), info.get("architecture", ""),
                                             info.get("bos", ""), info.get("eos", ""))
                sm.info.context_length = info["n_ctx_seq"]
                sm.unload_pending = False
                load_ns = time.perf_counter_ns() - t0
            if keep_alive is not None or sm.expires_at is None or load_ns:
                self._keep(sm, keep_alive)
            return sm.worker, load_ns

    def _restart_soon(self, sm: ServedModel) -> None:
        """A worker died unasked: start a new one now, so the next request finds it ready."""
        self.restarts += 1

        async def restart() -> None:
            try:
                await self._worker(sm, None)
            except HearthError as exc:
                log.error("could not restart the engine worker for %s: %s", sm.info.id, exc.message)

        self._tasks.add(task := asyncio.ensure_future(restart()))
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> dict[str, Any]:
        """Queue depth, active sequences and restarts (for /metrics)."""
        outstanding = sum(sm.worker.outstanding for sm in self.served.values() if sm.worker)
        return {
            "queue_depth": max(0, outstanding - self.settings.slots),
            "active_sequences": min(outstanding, self.settings.slots),
            "restarts": self.restarts,
        }

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for sm in list(self.served.values()):  # a pull or rm may change the table while a worker stops
                w = sm.worker
                if w and sm.expires_at is not None and sm.expires_at <= now and not w.outstanding:
                    log.info("unloading %s (keep-alive expired)", sm.info.id)
                    sm.worker, sm.unload_pending = None, False
                    try:
                        await w.stop()
                    except Exception:  # one bad stop must not end unloading for every model
                        log.exception("stopping the worker of %s failed", sm.info.id)

    # -- requests ---------------------------------------------------------------
    def _prompt(self, sm: ServedModel, req: GenerateRequest) -> tuple[str, bool]:
        if req.messages is None:
            return req.prompt or "", True
        if any(m.images for m in req.messages):
            raise BadRequest(f"model {sm.info.id!r} cannot see images; send text only or use a vision model",
                             param="messages")
        assert sm.formatter is not None
        text = sm.formatter.render(req.messages, tool_calls.active_tools(req))
        bos = sm.formatter.bos
        return text, not (bos and text.startswith(bos))

    def _admit(self, worker: WorkerClient) -> None:
        limit = self.capacity
        if worker.outstanding >= limit:
            raise RateLimited(
                f"the in-box engine is busy ({worker.outstanding} requests running or queued, limit {limit}); "
                "retry after a moment", retry_after=1)

    async def generate(self, model: ModelInfo, req: GenerateRequest) -> LlamaGeneration | ToolCallGeneration:
        t0 = time.perf_counter_ns()
        sm = self._served(model)
        tools = tool_calls.active_tools(req) if req.is_chat else []
        if tools and req.response_format.type != "text":
            raise BadRequest("the in-box engine cannot enforce a JSON format on an answer that may be a "
                             "tool call; send either `tools` or `response_format` (Ollama: `format`)",
                             param="response_format")
        worker, load_ns = await self._worker(sm, req.keep_alive)
        self._admit(worker)
        prompt, add_special = self._prompt(sm, req)
        spec = sampler_spec(req)
        if tools:
            spec.grammar, spec.grammar_triggers = tool_calls.sampling_grammar(req)
        rid = worker.new_id()
        box = worker.open(rid)
        try:
            worker.send("gen", rid, prompt, add_special, spec, req.max_tokens, self._stops(req, tools), req.num_ctx,
                        req.max_tokens_cap)
            first = await box.get()
        except BaseException:
            worker.close_box(rid)
            raise
        if first[0] != "accepted":
            worker.close_box(rid)
            raise self._error(first, sm, "messages" if req.is_chat else "prompt")
        gen = LlamaGeneration(worker, rid, box, first[2], load_ns, t0, lambda: self._keep(sm, req.keep_alive))
        if tools:
            names = {t["function"]["name"] for t in tools}
            strict = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"}
                      for t in tools if t["function"].get("strict")}
            return ToolCallGeneration(gen, names, tool_calls.forced(req), strict)
        return gen

    @staticmethod
    def _stops(req: GenerateRequest, tools: list[dict[str, Any]]) -> list[str]:
        """The request's stop strings; with tools and no parallel calls, the end of the first call too
        (a small model goes on writing after its call; the parser reads an unclosed last call)."""
        if tools and req.parallel_tool_calls is not True:
            return [*req.stop, tool_calls.CLOSE]
        return req.stop

    def _error(self, msg: tuple[Any, ...], sm: ServedModel, param: str) -> HearthError:
        if msg[0] == "dead":
            return EngineUnavailable(
                f"the engine worker for {sm.info.id} stopped (exit {msg[2]}); it is being restarted, retry",
                retry_after=1)
        kind, detail = msg[2], msg[3]
        if kind == "context":
            prompt, completion, limit = detail
            if completion:
                return ContextLengthExceeded(
                    f"this model's context is {limit} tokens, but you asked for {prompt + completion} "
                    f"({prompt} in the prompt, {completion} for the completion); shorten the prompt "
                    "or lower max_tokens", param=param)
            return ContextLengthExceeded(
                f"this model's context is {limit} tokens, but the prompt is {prompt} tokens; "
                "shorten the prompt (or raise ctx_per_slot)", param=param)
        if kind == "embed_context":  # detail: (tokens, which input, limit)
            tokens, index, limit = detail
            fix = "or send truncate: true (the default) to cut it" if record.dialect() == "ollama" else "or split it"
            return ContextLengthExceeded(f"input[{index}] is {tokens} tokens, over this model's context of {limit}; "
                                         f"shorten it, {fix}", param="input")
        if kind == "bad_request":  # detail: (text, the field it is about or None)
            text, field = detail
            return BadRequest(text, param=field or param)
        return EngineUnavailable(f"engine error: {detail}")

    async def embed(self, model: ModelInfo, req: EmbedRequest) -> EmbedResult:
        t0 = time.perf_counter_ns()
        sm = self._served(model)
        native = sm.info.embedding_dimension or 0
        allowed = sm.info.embedding_dimensions or [native]
        if req.dimensions is not None and req.dimensions not in allowed:
            raise BadRequest(
                f"model {model.id!r} gives {native}-dimensional embeddings and declares no support for "
                f"{req.dimensions}; drop `dimensions` or use one of {allowed}", param="dimensions")
        worker, load_ns = await self._worker(sm, req.keep_alive)
        self._admit(worker)
        rid = worker.new_id()
        box = worker.open(rid)
        try:
            worker.send("embed", rid, req.inputs, req.truncate)
            msg = await box.get()
        except BaseException:
            if worker.alive:
                worker.send("cancel", rid)
            raise
        finally:
            worker.close_box(rid)
        if msg[0] != "embedding":
            raise self._error(msg, sm, "input")
        vectors = msg[2]
        if req.dimensions is not None and req.dimensions != native:
            vectors = [_renorm(v[: req.dimensions]) for v in vectors]
        self._keep(sm, req.keep_alive)
        return EmbedResult(vectors=vectors, prompt_tokens=msg[3], model=model.id,
                           total_ns=time.perf_counter_ns() - t0, load_ns=load_ns)

    # -- status -------------------------------------------------------------------
    async def ready(self) -> bool:
        default = self.served.get(self.settings.default_model) or self.served.get(
            f"{self.settings.default_model}:latest")
        if default is None:
            return bool(self.served)
        if default.worker is None:
            return True  # unloaded on purpose (keep-alive, `ollama stop`): a probe must not load it again
        try:
            worker, _ = await self._worker(default, None)
        except HearthError:
            return False
        return worker.alive

    async def loaded(self) -> list[LoadedModel]:
        return [
            LoadedModel(sm.info.id, sm.info.size_bytes, sm.info.context_length, sm.expires_at)
            for sm in self.served.values() if sm.worker and sm.worker.alive
        ]

    async def load(self, model: ModelInfo, keep_alive: float | None) -> float:
        t0 = time.perf_counter()
        await self._worker(self._served(model), keep_alive)
        return time.perf_counter() - t0

    async def unload(self, model: ModelInfo) -> None:
        sm = self._served(model)
        if sm.worker and sm.worker.outstanding:
            # Requests still running: let them finish, the reaper unloads when idle.
            sm.expires_at, sm.unload_pending = time.time(), True
            return
        if sm.worker:
            worker, sm.worker = sm.worker, None
            await worker.stop()

    def worker_pid(self, model_id: str) -> int | None:
        """PID of a model's worker (for tests and `hearth ps`)."""
        sm = self.served.get(model_id)
        return sm.worker.pid if sm and sm.worker else None


def _logprob(entry: tuple[bytes, float, list[tuple[bytes, float]]]) -> TokenLogprob:
    """A worker's (bytes, logprob, alternatives) entry as the core type."""
    raw, lp, top = entry
    return TokenLogprob(token=raw.decode("utf-8", "replace"), logprob=lp, bytes=list(raw),
                        top=[TokenLogprob(t.decode("utf-8", "replace"), v, list(t)) for t, v in top])


def _renorm(vec: list[float]) -> list[float]:
    norm = sum(x * x for x in vec) ** 0.5 or 1.0
    return [x / norm for x in vec]

