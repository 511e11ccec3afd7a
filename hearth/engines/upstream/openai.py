"""Kind `openai`: any OpenAI-compatible server (llama-server, vLLM, LM Studio, LocalAI, cloud).

Pure wire code: request bodies from core types, SSE lines to text, usage and
finish reasons to core. The engine in `engine.py` does the I/O.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

import orjson

from hearth.core import tools
from hearth.core.errors import UpstreamError
from hearth.core.types import EmbedRequest, GenerateRequest, Message, ToolCall, Usage
from hearth.engines.upstream.stream import StreamParser
from hearth.settings import UpstreamModel

FINISH = {"stop": "stop", "length": "length", "eos": "stop", "content_filter": "content_filter",
          "tool_calls": "tool_calls", "function_call": "stop"}
# Sampling fields of the OpenAI API itself; the others are llama.cpp/vLLM extras.
STANDARD = {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias"}
EXTRAS = {"top_k", "min_p", "repeat_penalty", "repeat_last_n"}  # llama-server takes all four
UNSUPPORTED = {"num_ctx", "keep_alive"}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                   "repeat_penalty", "repeat_last_n", "logit_bias")  # in `_sampling`'s order
# An SSE data line's value, trimmed. The value ends at its last non-blank byte: a lazy `(.*?)` before
# trailing blanks would try the tail at every byte (15x slower, on every upstream read).
DATA_LINE = re.compile(rb"^data:[^\S\n]*((?:[^\n]*\S)?)", re.MULTILINE)
DONE = b"[DONE]"
PLAIN_DELTA = frozenset({"role", "content", "refusal"})  # delta keys that carry nothing but text


def _content(msg: Message) -> Any:
    if not msg.images:
        return msg.content
    parts: list[dict[str, Any]] = [{"type": "text", "text": msg.content}] if msg.content else []
    for img in msg.images:
        url = "data:image/png;base64," + base64.b64encode(img).decode("ascii")
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Chat turns in OpenAI's shape; a tool result names the call it answers by id."""
    answered = tools.answered_calls(messages)
    out = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role, "content": _content(m)}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in m.tool_calls]
        if m.role == "tool":
            call = answered.get(i)
            msg["tool_call_id"] = m.tool_call_id or (call.id if call else "")
            if m.name or call:
                msg["name"] = m.name or call.name  # type: ignore[union-attr]
        elif m.name:  # who said it, among several users
            msg["name"] = m.name
        out.append(msg)
    return out


def _response_format(req: GenerateRequest) -> dict[str, Any] | None:
    fmt = req.response_format
    if fmt.type == "json":
        return {"type": "json_object"}
    if fmt.type == "json_schema":
        schema = {"name": fmt.name or "response", "schema": fmt.schema, "strict": fmt.strict}
        return {"type": "json_schema", "json_schema": schema}
    return None


class OpenAIWire:
    """Request bodies and response parsing for `/v1/*` servers."""

    kind = "openai"
    models_path = "/v1/models"
    health_path = "/v1/models"
    managed_ready_path = "/health"

    def __init__(self, cloud: bool) -> None:
        # A cloud API rejects unknown parameters; local servers accept the extras.
        self.allowed = STANDARD if cloud else STANDARD | EXTRAS
        self.cloud = cloud

    def generate_body(self, model: str, req: GenerateRequest, drop: Callable[[str], None]) -> tuple[str, bytes]:
        """The path and JSON body of a streamed chat or completion request."""
        body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
        if req.messages is not None:
            path = "/v1/chat/completions"
            body["messages"] = _messages(req.messages)
            if req.tools:
                body["tools"] = req.tools
            for key in ("tool_choice", "parallel_tool_calls"):
                if getattr(req, key) is not None:
                    body[key] = getattr(req, key)
            if req.logprobs is not None:  # at least 1: llama-server sends no logprobs at all for 0
                body["logprobs"], body["top_logprobs"] = True, max(1, req.logprobs)
        else:
            path = "/v1/completions"
            body["prompt"] = req.prompt or ""
            if req.logprobs is not None:
                body["logprobs"] = max(1, req.logprobs)
        self._sampling(body, req, drop)
        self._think(body, req, drop)
        if (limit := req.max_tokens or req.max_tokens_cap) is not None:
            body["max_completion_tokens" if self.cloud and req.messages is not None else "max_tokens"] = limit
        if req.stop:
            body["stop"] = req.stop
        rf = _response_format(req)
        if rf is not None:
            body["response_format"] = rf
        if req.num_ctx is not None:
            drop("num_ctx")
        return path, orjson.dumps(body)

    def _sampling(self, body: dict[str, Any], req: GenerateRequest, drop: Callable[[str], None]) -> None:
        s = req.sampling
        values = (s.temperature, s.top_p, s.top_k, s.min_p, s.seed, s.presence_penalty, s.frequency_penalty,
                  s.repeat_penalty, s.repeat_last_n, {str(k): v for k, v in s.logit_bias.items()} or None)
        if values.count(None) == len(values):  # nothing set (many requests): no loop
            return
        for key, value in zip(SAMPLING_FIELDS, values):
            if value is None:
                continue
            if key in self.allowed:
                body[key] = value
            else:
                drop(key)

    def _think(self, body: dict[str, Any], req: GenerateRequest, drop: Callable[[str], None]) -> None:
        """An effort is `reasoning_effort`; on and off are the chat template's `enable_thinking` switch
        (vLLM, llama-server, SGLang), which a cloud API does not take (its reasoning models think
        unasked)."""
        if isinstance(req.think, str):
            body["reasoning_effort"] = req.think
        elif isinstance(req.think, bool):
            if self.cloud:
                drop("think")
            else:
                body["chat_template_kwargs"] = {"enable_thinking": req.think}

    def parser(self, chat: bool) -> SSEParser:
        """A parser for one streamed response."""
        return SSEParser(chat)

    def embed_body(self, model: str, req: EmbedRequest) -> tuple[str, bytes]:
        """The path and JSON body of an embeddings request."""
        body: dict[str, Any] = {"model": model, "input": req.inputs, "encoding_format": "float"}
        if req.dimensions is not None:
            body["dimensions"] = req.dimensions
        return "/v1/embeddings", orjson.dumps(body)

    def embed_result(self, data: Any) -> tuple[list[list[float]], int]:
        """Vectors (in input order) and prompt tokens of an embeddings response."""
        try:
            items = sorted(data["data"], key=lambda d: d.get("index", 0))
            vectors = [list(map(float, d["embedding"])) for d in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"embeddings response has no data[].embedding ({exc!r})") from None
        usage = data.get("usage") or {}
        return vectors, int(usage.get("prompt_tokens") or 0)

    def model_list(self, data: Any) -> list[UpstreamModel]:
        """Models from a `/v1/models` response."""
        models = []
        for item in data.get("data") or data.get("models") or []:
            name = item.get("id") or item.get("name") or item.get("model")
            if not name:
                continue
            # llama-server's `meta.n_ctx` is what one request may use (its n_ctx_train is the
            # training size, often far larger than what it was started with); vLLM says max_model_len
            ctx = item.get("context_length") or item.get("max_model_len") or (item.get("meta") or {}).get("n_ctx")
            models.append(UpstreamModel(name=name, context_length=int(ctx or 0), embedding="embed" in name.lower()))
        return models

    def model_facts(self, data: Any) -> dict[str, dict[str, Any]]:
        """ModelInfo fields by model name, from `/v1/models` (only its `created` time is standard)."""
        return {str(item.get("id")): {"created": item["created"]} for item in data.get("data") or []
                if isinstance(item, dict) and isinstance(item.get("created"), int)}


class SSEParser(StreamParser):
    """Turns `data: {...}` lines of one stream into text, tool calls, finish reason and usage."""

    def __init__(self, chat: bool) -> None:
        super().__init__(chat)
        self._partial: dict[int, list[str]] = {}  # tool call index -> [id, name, arguments so far]

    def payloads(self, lines: list[bytes]) -> list[bytes]:
        """The JSON of each `data:` line, up to `[DONE]`; separators, comments and `event:` lines are
        skipped (one regex over the read, no Python loop: this runs per upstream read)."""
        found = DATA_LINE.findall(b"\n".join(lines))
        if DONE in found:
            self.done = True
            del found[found.index(DONE):]
        return list(filter(None, found))

    def event(self, event: dict[str, Any]) -> str:
        """One chunk of the stream; returns its text."""
        choices = event.get("choices")
        if not choices and "error" in event:
            err = event["error"]
            raise UpstreamError(f"reported an error mid-stream: {err.get('message', err) if isinstance(err, dict) else err}")
        if event.get("usage"):
            self.usage = usage_of(event["usage"])
        if not choices:
            return ""
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish = FINISH.get(choice["finish_reason"], "stop")
        if choice.get("logprobs"):
            self._logprobs(choice["logprobs"])
        if not self.chat:
            return choice.get("text") or ""
        delta = choice.get("delta") or {}
        if delta.keys() <= PLAIN_DELTA:  # the usual chunk: no reasoning, no tool calls to look for
            if delta.get("refusal"):  # OpenAI declining (structured outputs): not the answer's text
                self.refusal.append(delta["refusal"])
            return delta.get("content") or ""
        thinking = delta.get("reasoning_content") or delta.get("reasoning")  # vLLM/llama-server/DeepSeek; newer vLLM
        if thinking:
            self.thinking.append(thinking)
        if delta.get("tool_calls"):
            self._tool_deltas(delta["tool_calls"])
        return delta.get("content") or ""

    def _logprobs(self, lp: Any) -> None:
        """Chat's `{content: [...]}` (llama-server sends it for completions too) or legacy completions'
        parallel lists."""
        if not isinstance(lp, dict):
            raise UpstreamError(f"sent logprobs that are not an object: {lp!r:.120}")
        if self.chat or "content" in lp:
            self.add_logprobs(lp.get("content") or [])
            return
        tokens, values = lp.get("tokens") or [], lp.get("token_logprobs") or []
        tops = lp.get("top_logprobs") or [None] * len(tokens)
        if not (isinstance(tokens, list) and isinstance(values, list) and isinstance(tops, list)):
            raise UpstreamError(f"sent completion logprobs that are not lists: {lp!r:.120}")
        self.add_logprobs([
            {"token": t, "logprob": v, "top_logprobs": [{"token": k, "logprob": x} for k, x in (top or {}).items()]}
            for t, v, top in zip(tokens, values, tops)])

    def _tool_deltas(self, deltas: list[Any]) -> None:
        """Pieces of tool calls: the first of a call has its id and name, the rest add to its arguments."""
        for d in deltas:
            if not isinstance(d, dict):
                raise UpstreamError(f"sent a tool call delta that is not an object: {d!r:.120}")
            fn = d.get("function") or {}
            index = d.get("index")
            if index is None:  # servers that leave it out: an id or a name starts a call, the rest continue it
                starts = d.get("id") or fn.get("name") or not self._partial
                index = len(self._partial) if starts else max(self._partial)
            if type(index) is not int:
                raise UpstreamError(f"sent a tool call delta whose index is not an integer: {d!r:.120}")
            part = self._partial.setdefault(index, ["", "", ""])
            part[0] = part[0] or d.get("id") or ""
            part[1] = part[1] or fn.get("name") or ""
            part[2] += tools.arguments_text(fn.get("arguments")) if fn.get("arguments") is not None else ""
        self.calls_seen = True

    def tool_calls(self) -> list[ToolCall]:
        """The calls the stream made, whole, in index order."""
        return [ToolCall(name=name, arguments=args or "{}", id=cid or tools.new_call_id())
                for _, (cid, name, args) in sorted(self._partial.items())]


def usage_of(u: dict[str, Any]) -> Usage:
    """OpenAI `usage` -> core Usage."""
    details = u.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(u.get("prompt_tokens") or 0),
        completion_tokens=int(u.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
    )
