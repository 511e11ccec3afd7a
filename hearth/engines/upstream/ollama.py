"""Kind `ollama`: a native Ollama server (`/api/chat`, `/api/generate`, `/api/embed`, `/api/tags`).

Pure wire code: request bodies from core types, NDJSON lines to text, usage
(with Ollama's nanosecond timings) and done reasons to core.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from typing import Any

import orjson

from hearth.core import tools
from hearth.core.errors import BadRequest, UpstreamError
from hearth.core.types import EmbedRequest, GenerateRequest, Message, ToolCall, Usage
from hearth.engines.upstream.stream import StreamParser
from hearth.settings import UpstreamModel

DONE = {"stop": "stop", "length": "length", "load": "stop", "unload": "stop"}
OPTIONS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
}


def _format(req: GenerateRequest) -> Any:
    fmt = req.response_format
    if fmt.type == "json":
        return "json"
    if fmt.type == "json_schema":
        return fmt.schema
    return None


def _arguments(call: ToolCall) -> dict[str, Any]:
    args = tools.arguments_object(call)
    if args is None:
        raise BadRequest(f"tool call {call.name!r} in the history has arguments that are not a JSON object; "
                         "an Ollama upstream needs an object", param="messages")
    return args


def _keep_alive(seconds: float | None) -> Any:
    if seconds is None:
        return None
    return -1 if seconds < 0 else f"{int(seconds)}s"


class OllamaWire:
    """Request bodies and response parsing for native Ollama servers."""

    kind = "ollama"
    models_path = "/api/tags"
    health_path = "/api/version"
    managed_ready_path = "/api/version"

    def __init__(self, cloud: bool) -> None:
        self.cloud = cloud

    def generate_body(self, model: str, req: GenerateRequest, drop: Callable[[str], None]) -> tuple[str, bytes]:
        """The path and JSON body of a streamed chat or generate request."""
        body: dict[str, Any] = {"model": model, "stream": True, "options": self._options(req, drop)}
        if req.messages is not None:
            path = "/api/chat"
            answered = tools.answered_calls(req.messages)
            body["messages"] = [self._message(m, answered.get(i)) for i, m in enumerate(req.messages)]
            choice = req.tool_choice
            if req.tools and choice != "none":  # Ollama has no tool_choice: "none" is sending no tools
                named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
                # a named function: only that one is offered (Ollama cannot force the call itself)
                body["tools"] = [t for t in req.tools if t.get("function", {}).get("name") == named] \
                    if named else req.tools
            if choice not in (None, "auto", "none"):
                drop("tool_choice")  # "required" or a name: the model still decides whether to call
            if req.parallel_tool_calls is not None:
                drop("parallel_tool_calls")
        else:
            path = "/api/generate"
            body["prompt"] = req.prompt or ""
            body["raw"] = True  # core prompts are already rendered
        if req.logprobs is not None:
            body["logprobs"], body["top_logprobs"] = True, req.logprobs
        if req.think is not None:
            body["think"] = req.think
        fmt = _format(req)
        if fmt is not None:
            body["format"] = fmt
        keep = _keep_alive(req.keep_alive)
        if keep is not None:
            body["keep_alive"] = keep
        return path, orjson.dumps(body)

    @staticmethod
    def _message(m: Message, answers: ToolCall | None) -> dict[str, Any]:
        out: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.images:
            out["images"] = [base64.b64encode(img).decode("ascii") for img in m.images]
        if m.tool_calls:
            out["tool_calls"] = [{"function": {"name": c.name, "arguments": _arguments(c)}} for c in m.tool_calls]
        if m.role == "tool" and (m.name or answers):
            out["tool_name"] = m.name or answers.name  # type: ignore[union-attr]
        return out

    @staticmethod
    def _options(req: GenerateRequest, drop: Callable[[str], None]) -> dict[str, Any]:
        s = req.sampling
        options = {name: getattr(s, field) for field, name in OPTIONS.items() if getattr(s, field) is not None}
        if s.logit_bias:
            drop("logit_bias")
        if (limit := req.max_tokens or req.max_tokens_cap) is not None:
            options["num_predict"] = limit
        if req.stop:
            options["stop"] = req.stop
        if req.num_ctx is not None:
            options["num_ctx"] = req.num_ctx
        return options

    def parser(self, chat: bool) -> NDJSONParser:
        """A parser for one streamed response."""
        return NDJSONParser(chat)

    def embed_body(self, model: str, req: EmbedRequest) -> tuple[str, bytes]:
        """The path and JSON body of an `/api/embed` request."""
        body: dict[str, Any] = {"model": model, "input": req.inputs, "truncate": req.truncate}
        if req.dimensions is not None:
            body["dimensions"] = req.dimensions
        keep = _keep_alive(req.keep_alive)
        if keep is not None:
            body["keep_alive"] = keep
        return "/api/embed", orjson.dumps(body)

    def embed_result(self, data: Any) -> tuple[list[list[float]], int]:
        """Vectors and prompt tokens of an `/api/embed` response."""
        try:
            vectors = [list(map(float, v)) for v in data["embeddings"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"embed response has no embeddings ({exc!r})") from None
        return vectors, int(data.get("prompt_eval_count") or 0)

    def model_list(self, data: Any) -> list[UpstreamModel]:
        """Models from an `/api/tags` response."""
        models = []
        for item in data.get("models") or []:
            name = item.get("name") or item.get("model")
            if not name:
                continue
            family = ((item.get("details") or {}).get("family") or "").lower()
            embedding = "bert" in family or "embed" in name.lower()
            models.append(UpstreamModel(name=name, embedding=embedding))
        return models

    def load_body(self, model: str, keep_alive: float | None) -> bytes:
        """`/api/generate` without a prompt: Ollama loads the model (keep_alive 0: unloads it)."""
        keep = _keep_alive(keep_alive)
        return orjson.dumps({"model": model} if keep is None else {"model": model, "keep_alive": keep})

    def show_facts(self, data: Any) -> dict[str, Any]:
        """ModelInfo fields from an `/api/show` answer: capabilities, template, parameters, GGUF keys."""
        facts: dict[str, Any] = {}
        caps = data.get("capabilities")
        if isinstance(caps, list) and caps and all(isinstance(c, str) for c in caps):
            facts["capabilities"] = caps
        if isinstance(data.get("template"), str) and data["template"]:
            facts["chat_template"] = data["template"]
        info = data.get("model_info")
        metadata: dict[str, Any] = dict(info) if isinstance(info, dict) else {}
        if isinstance(data.get("license"), str) and data["license"]:
            metadata["general.license"] = data["license"]
        if isinstance(data.get("parameters"), str):
            metadata["parameters"] = data["parameters"]  # no dot: hearth's note, not a GGUF key
        facts["metadata"] = metadata
        return facts

    def running(self, data: Any) -> list[tuple[str, int, int, float]]:
        """(name, size, context length, expiry as Unix time) of each model an `/api/ps` answer lists."""
        out = []
        for item in data.get("models") or []:
            name = item.get("name") or item.get("model")
            if isinstance(name, str) and name:
                out.append((name, int(item.get("size") or 0), int(item.get("context_length") or 0),
                            float(_unix_time(item.get("expires_at")))))
        return out

    def model_facts(self, data: Any) -> dict[str, dict[str, Any]]:
        """ModelInfo fields by model name, from `/api/tags`: what Ollama clients show of a model."""
        facts: dict[str, dict[str, Any]] = {}
        for item in data.get("models") or []:
            name = item.get("name") or item.get("model")
            details = item.get("details") or {}
            if not name or not isinstance(details, dict):
                continue
            family = str(details.get("family") or "")
            facts[name] = {
                "family": family, "architecture": family,
                "quantization": str(details.get("quantization_level") or ""),
                "size_bytes": int(item.get("size") or 0),
                "digest": str(item.get("digest") or "").removeprefix("sha256:"),
                "created": _unix_time(item.get("modified_at")),
                "metadata": {"size_label": str(details.get("parameter_size") or "")},
            }
        return facts


class NDJSONParser(StreamParser):
    """Turns the JSON lines of one Ollama stream into text, tool calls, done reason and usage."""

    def payload(self, line: bytes) -> bytes | None:
        """The line itself (each line is one JSON event); None for blank lines."""
        return line.strip() or None

    def event(self, event: dict[str, Any]) -> str:
        """One line of the stream; returns its text."""
        if "error" in event:
            raise UpstreamError(f"reported an error mid-stream: {event['error']}")
        if not self.chat:
            text = event.get("response") or ""
            if event.get("thinking"):
                self.thinking.append(event["thinking"])
        else:
            message = event.get("message") or {}
            text = message.get("content") or ""
            if message.get("thinking"):
                self.thinking.append(message["thinking"])
            for call in message.get("tool_calls") or ():  # Ollama sends each call whole
                if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
                    raise UpstreamError(f"sent a tool call without a function: {call!r:.120}")
                fn = call["function"]
                self.calls.append(ToolCall(name=fn.get("name") or "", arguments=tools.arguments_text(fn.get("arguments")),
                                           id=call.get("id") or tools.new_call_id()))
                self.calls_seen = True
        if event.get("logprobs"):
            self.add_logprobs(event["logprobs"])
        if event.get("done"):
            self.done = True
            self.finish = DONE.get(event.get("done_reason") or "stop", "stop")
            self.usage = Usage(
                prompt_tokens=int(event.get("prompt_eval_count") or 0),
                completion_tokens=int(event.get("eval_count") or 0),
                load_ns=int(event.get("load_duration") or 0),
                prompt_ns=int(event.get("prompt_eval_duration") or 0),
                generate_ns=int(event.get("eval_duration") or 0),
                total_ns=int(event.get("total_duration") or 0),
            )
        return text


def _unix_time(stamp: Any) -> int:
    """An RFC 3339 time (Ollama writes nanoseconds and an offset) as Unix seconds; 0 if unreadable."""
    if not isinstance(stamp, str):
        return 0
    try:
        return int(dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
