"""Small fake upstream servers on 127.0.0.1 for fault-injection tests.

`FakeUpstream(kind="openai"|"ollama", mode=...)` runs an aiohttp server in a
thread. Modes: ok, error500, die (breaks the stream after two pieces),
stall (never answers), stall_mid (one piece, then silence until the client
hangs up, counted in `cut`), endless_line (one SSE line of 20 MB that never ends), badjson (structured
output that fails the schema), noembed (embeddings answer 501, as llama-server
without `--embeddings` and Ollama for a chat-only model do), tools (a request with `tools` gets the calls
in `CALLS` back, as OpenAI deltas in pieces or as whole Ollama calls; with
`bad_args` the arguments are not a JSON object). A request for logprobs gets
each piece as one token with logprob -0.5 and the alternatives asked for;
`think` sends the reasoning in `THOUGHTS` before the answer; `refuse` declines a chat in `REFUSAL`
pieces, as OpenAI does; a prompt longer than `CONTEXT` characters
gets the 400 each server sends for it, and two user turns in a row the 500 llama-server sends for them. `delay` slows every answer; `requests` counts
generation calls; `bodies` keeps the JSON bodies received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any

from aiohttp import web

PIECES = ["Hello", " from", " upstream"]
THOUGHTS = ["Let me", " think."]
REFUSAL = ["I'm sorry,", " I cannot help with that."]
CONTEXT = 2000
CALLS = [("get_weather", {"city": "Tokyo", "unit": "c"}), ("get_time", {"zone": "JST"})]


class FakeUpstream:
    """An OpenAI-compatible or Ollama-native fake server with scripted faults."""

    def __init__(self, kind: str = "openai", mode: str = "ok", delay: float = 0.0, port: int = 0,
                 models: tuple[str, ...] = ("m", "e-embed"), dimension: int = 8) -> None:
        self.kind = kind
        self.mode = mode
        self.delay = delay
        self.port = port
        self.models = models
        self.dimension = dimension
        self.requests = 0
        self.cut = 0
        self.stalled = 0  # stall_mid requests still waiting for the client to hang up
        self.bodies: list[dict[str, Any]] = []
        self.request_ids: list[str | None] = []  # the X-Request-Id of each generation request
        self.loads: list[dict[str, Any]] = []  # Ollama load / unload requests (no prompt)
        self.transports: list[Any] = []  # the connections generation requests came on
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self) -> None:
        app = web.Application()
        if self.kind == "openai":
            app.router.add_get("/v1/models", self._models_openai)
            app.router.add_get("/health", self._health)
            app.router.add_post("/v1/chat/completions", self._generate)
            app.router.add_post("/v1/completions", self._generate)
            app.router.add_post("/v1/embeddings", self._embed)
        else:
            app.router.add_get("/api/tags", self._models_ollama)
            app.router.add_get("/api/version", self._health)
            app.router.add_post("/api/chat", self._generate)
            app.router.add_post("/api/generate", self._generate)
            app.router.add_post("/api/embed", self._embed)
            app.router.add_post("/api/show", self._show)
            app.router.add_get("/api/ps", self._ps)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": "0.0.0"})

    async def _models_openai(self, request: web.Request) -> web.Response:
        if self.mode == "error500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        meta = {"n_ctx": 4096, "n_ctx_train": 32768}  # llama-server's: per-request context, training size
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "meta": meta}
                                                             for m in self.models]})

    async def _models_ollama(self, request: web.Request) -> web.Response:
        def entry(m: str) -> dict[str, Any]:  # as Ollama lists a model
            family = "nomic-bert" if "embed" in m else "llama"
            return {"name": m, "model": m, "modified_at": "2024-06-04T14:38:31.83753-07:00", "size": 4661224676,
                    "digest": "sha256:365c0bd3c000a25d28ddbf732fe1c6add414de7275464c4e4d1c3b5fcb5d8ad1",
                    "details": {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                                "parameter_size": "8.0B", "quantization_level": "Q4_0"}}
        return web.json_response({"models": [entry(m) for m in self.models]})

    async def _ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{  # as Ollama shows its first model, loaded
            "name": self.models[0], "model": self.models[0], "size": 6654289920, "size_vram": 0,
            "digest": "365c0bd3", "details": {"family": "llama"}, "context_length": 8192,
            "expires_at": "2030-01-02T03:04:05.123456789+01:00"}]})

    async def _show(self, request: web.Request) -> web.Response:
        name = (await request.json()).get("model")
        if name not in self.models:
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        return web.json_response({  # as Ollama shows a vision model (model_info cut short)
            "license": "LLAMA 3.2 COMMUNITY LICENSE", "modelfile": "FROM x",
            "parameters": 'stop                           "<|eot_id|>"', "template": "{{ .Prompt }}",
            "details": {"family": "mllama", "parameter_size": "10.7B", "quantization_level": "Q4_K_M"},
            "model_info": {"general.architecture": "mllama", "mllama.context_length": 131072},
            "capabilities": ["completion", "vision", "tools"],
        })

    async def _embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        if self.mode == "noembed" and self.kind == "openai":  # llama-server started without --embeddings
            return web.json_response({"error": {"code": 501, "type": "not_supported_error", "message":
                                      "This server does not support embeddings. Start it with `--embeddings`"}},
                                     status=501)
        if self.mode == "noembed":  # Ollama, for a model without the embedding capability
            return web.json_response({"error": "this model does not support embeddings"}, status=501)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        # Ollama shortens to `dimensions`; llama-server (the openai kind here) ignores it
        size = (body.get("dimensions") or self.dimension) if self.kind == "ollama" else self.dimension
        vecs = [[float(i + 1)] * size for i, _ in enumerate(inputs)]
        if self.kind == "openai":
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
            return web.json_response({"data": data, "usage": {"prompt_tokens": 3, "total_tokens": 3}})
        return web.json_response({"embeddings": vecs, "prompt_eval_count": 3})

    def _context_full(self) -> web.Response:
        if self.kind == "openai":  # llama-server's words (vLLM and OpenAI say "maximum context length")
            return web.json_response({"error": {"code": 400, "type": "exceed_context_size_error", "message":
                                      "request (5024 tokens) exceeds the available context size (2048 tokens), "
                                      "try increasing it"}}, status=400)
        return web.json_response({"error": "input length exceeds the context length"}, status=400)

    def _text_pieces(self, body: dict[str, Any]) -> list[str]:
        wants_json = body.get("response_format") or body.get("format")
        if wants_json:
            return ['{"name": 5}'] if self.mode == "badjson" else ['{"name": ', '"ok"}']
        return PIECES + [f" {self.port}"]

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.kind == "ollama" and "prompt" not in body and "messages" not in body:  # load / unload
            self.loads.append(body)
            unload = body.get("keep_alive") in (0, "0s", "0")
            return web.json_response({"model": body.get("model"), "response": "", "done": True,
                                      "done_reason": "unload" if unload else "load"})
        self.requests += 1
        self.bodies.append(body)
        if not any(request.transport is seen for seen in self.transports):
            self.transports.append(request.transport)  # one per connection hearth opened
        self.request_ids.append(request.headers.get("X-Request-Id"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "error500":
            return web.json_response({"error": {"message": "internal boom"}}, status=500)
        roles = [m.get("role") for m in body.get("messages") or ()]
        if any(a == b == "user" for a, b in zip(roles, roles[1:])):  # as llama-server's Gemma template says
            return web.json_response({"error": {"code": 500, "type": "server_error", "message":
                                                "Conversation roles must alternate user/assistant/user/assistant/..."}},
                                     status=500)
        if self.mode == "stall":
            await asyncio.sleep(3600)
        if self.mode == "endless_line":  # a broken server: one line that never ends
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"choices": [{"delta": {"content": "')
            with contextlib.suppress(ConnectionError):
                for _ in range(200):  # 20 MB, unless hearth hangs up first
                    await resp.write(b"x" * 100_000)
            return resp
        if len(json.dumps(body.get("messages") or body.get("prompt") or "")) > CONTEXT:
            return self._context_full()
        if self.kind == "openai" and '"image_url"' in json.dumps(body.get("messages") or []):
            # llama-server's answer for a model started without a projector (--mmproj): a 500
            return web.json_response({"error": {"code": 500, "type": "server_error", "message":
                                      "image input is not supported - hint: if this is unexpected, "
                                      "you may need to provide the mmproj"}}, status=500)
        chat = request.path.endswith("chat") or request.path.endswith("chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream" if self.kind == "openai"
                                           else "application/x-ndjson"})
        await resp.prepare(request)
        if self.mode in ("tools", "bad_args") and body.get("tools"):
            for piece in self._tool_pieces():
                await resp.write(piece)
            return resp
        if self.mode == "refuse" and chat and self.kind == "openai":  # as OpenAI declines, in pieces
            for piece in REFUSAL:
                event = {"id": "x", "choices": [{"index": 0, "delta": {"content": None, "refusal": piece},
                                                 "finish_reason": None}]}
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await resp.write(self._end(chat, len(REFUSAL), "stop"))
            return resp
        if self.mode == "think":
            for thought in THOUGHTS:
                await resp.write(self._thought(thought, chat))
        pieces = self._text_pieces(body)
        for i, piece in enumerate(pieces):
            if self.mode == "die" and i == 2:
                await asyncio.sleep(0.2)  # let the pieces reach the client first
                assert request.transport is not None
                request.transport.abort()
                return resp
            if self.mode == "stall_mid" and i == 1:
                self.stalled += 1
                while request.transport is not None and not request.transport.is_closing():
                    await asyncio.sleep(0.02)
                self.cut += 1  # the client (hearth) hung up
                self.stalled -= 1
                return resp
            await resp.write(self._piece(piece, chat, self._wants_logprobs(body)))
        finish = "stop" if (body.get("response_format") or body.get("format")) else "length"
        await resp.write(self._end(chat, len(pieces), finish))
        return resp

    def _tool_pieces(self) -> list[bytes]:
        """The calls of CALLS: OpenAI deltas (id and name first, arguments in two pieces) or Ollama lines."""
        calls = [(name, "{city: Tokyo}" if self.mode == "bad_args" else json.dumps(args)) for name, args in CALLS]
        if self.kind == "ollama":
            whole = [{"function": {"name": n, "arguments": json.loads(a) if a.startswith('{"') else a}}
                     for n, a in calls]
            lines = [{"model": "m", "message": {"role": "assistant", "content": "", "tool_calls": whole},
                      "done": False},
                     {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True,
                      "done_reason": "stop", "prompt_eval_count": 7, "eval_count": 12}]
            return [(json.dumps(x) + "\n").encode() for x in lines]
        deltas = []
        for i, (name, args) in enumerate(calls):
            half = len(args) // 2
            deltas += [{"index": i, "id": f"call_{i}x", "type": "function",
                        "function": {"name": name, "arguments": ""}},
                       {"index": i, "function": {"arguments": args[:half]}},
                       {"index": i, "function": {"arguments": args[half:]}}]
        events = [{"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [d]},
                                           "finish_reason": None}]} for d in deltas]
        events.append({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        events.append({"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 12}})
        return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]

    def _thought(self, text: str, chat: bool) -> bytes:
        """A piece of reasoning: Ollama's `thinking`, or the `reasoning_content` delta of vLLM/llama-server."""
        if self.kind == "ollama":
            key = {"message": {"role": "assistant", "content": "", "thinking": text}} if chat else \
                {"response": "", "thinking": text}
            return (json.dumps({"model": "m", **key, "done": False}) + "\n").encode()
        choice = {"index": 0, "delta": {"reasoning_content": text}, "finish_reason": None}
        return b"data: " + json.dumps({"id": "x", "choices": [choice]}).encode() + b"\n\n"

    @staticmethod
    def _wants_logprobs(body: dict[str, Any]) -> int | None:
        """How many alternatives the request asked for (None: no logprobs)."""
        lp = body.get("logprobs")
        if lp is None or lp is False:
            return None
        return int(body.get("top_logprobs") or 0) if lp is True else int(lp)

    @staticmethod
    def _logprob_entry(text: str, top: int) -> dict[str, Any]:
        """The piece as one token with logprob -0.5, and `top` alternatives (the piece first)."""
        alts = [{"token": text, "logprob": -0.5, "bytes": list(text.encode())}]
        alts += [{"token": f"alt{k}", "logprob": -1.0 - k, "bytes": list(f"alt{k}".encode())} for k in range(1, top)]
        return {"token": text, "logprob": -0.5, "bytes": list(text.encode()), "top_logprobs": alts[:top]}

    def _piece(self, text: str, chat: bool, logprobs: int | None = None) -> bytes:
        entry = None if logprobs is None else self._logprob_entry(text, logprobs)
        if self.kind == "ollama":
            key = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
            extra = {"logprobs": [entry]} if entry else {}
            return (json.dumps({"model": "m", **key, **extra, "done": False}) + "\n").encode()
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
        if entry and chat:
            choice["logprobs"] = {"content": [entry]}
        elif entry:
            choice["logprobs"] = {"tokens": [text], "token_logprobs": [-0.5], "text_offset": [0],
                                  "top_logprobs": [{a["token"]: a["logprob"] for a in entry["top_logprobs"]}]}
        return b"data: " + json.dumps({"id": "x", "choices": [{**choice, "finish_reason": None}]}).encode() + b"\n\n"

    def _end(self, chat: bool, n: int, finish: str) -> bytes:
        if self.kind == "ollama":
            key = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
            return (json.dumps({"model": "m", **key, "done": True, "done_reason": finish, "prompt_eval_count": 7,
                                "eval_count": n, "eval_duration": 1000, "total_duration": 5000}) + "\n").encode()
        choice = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
        fin = json.dumps({"id": "x", "choices": [{**choice, "finish_reason": finish}]})
        usage = json.dumps({"id": "x", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n,
                                                                "total_tokens": 7 + n}})
        return f"data: {fin}\n\ndata: {usage}\n\ndata: [DONE]\n\n".encode()


class FakePair:
    """An OpenAI-compatible fake serving "m" (upstream `oai`) and an Ollama one (upstream `olla`)
    in the same mode, and the hearth.toml that declares them."""

    def __init__(self, mode: str = "ok", ollama_models: tuple[str, ...] = ("llamita:8b",)) -> None:
        self.oai = FakeUpstream(mode=mode).start()
        self.olla = FakeUpstream(kind="ollama", mode=mode, models=ollama_models).start()

    def config(self) -> str:
        return (f'[upstreams.oai]\nkind = "openai"\nurls = ["{self.oai.url}"]\nmodels = ["m"]\n\n'
                f'[upstreams.olla]\nkind = "ollama"\nurls = ["{self.olla.url}"]\n')

    def stop(self) -> None:
        self.oai.stop()
        self.olla.stop()
