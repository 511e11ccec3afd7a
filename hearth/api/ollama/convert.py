"""Pure converters: Ollama wire <-> core types. No I/O here (apart from logging).

Requests: `chat_request`, `generate_request`, `embed_request`,
`embeddings_request` turn wire models into core requests; `keep_alive`,
`options`, `format` and base64 images are interpreted here, each bad value a
400 that says how to fix it. Responses: `*_body` functions build the JSON
objects Ollama clients expect (timings in nanoseconds).
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
import time
from typing import Any

from hearth.api.common import logprob_entries, logprobs_setting
from hearth.api.ollama import schemas as w
from hearth.api.ollama.template import render_template
from hearth.core import tools
from hearth.core.errors import BadRequest, UpstreamError
from hearth.core.types import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    LoadedModel,
    Message,
    ModelInfo,
    ResponseFormat,
    Sampling,
    TokenLogprob,
    ToolCall,
    Usage,
)

log = logging.getLogger("hearth.ollama")

DONE_REASON = {"stop": "stop", "length": "length", "tool_calls": "stop", "cancelled": "stop", "error": "stop"}
DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
FOREVER_SECONDS = 292 * 365.25 * 86400  # what Ollama shows for "never expires"
KEEP_ALIVE_HINT = 'use a duration such as "5m", "1h30m", "30s", seconds as a number (300), 0 or a negative value'


# -- small values ------------------------------------------------------------------
def rfc3339(ts: float) -> str:
    """Unix time -> RFC 3339 / ISO 8601 in UTC with microseconds (`...Z`)."""
    secs = math.floor(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{int((ts - secs) * 1e6):06d}Z"


def _go_duration(text: str) -> float | None:
    """Seconds in a Go duration string ("1h30m", "-5m", "250ms"); None if not one."""
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in ("-", "+") else text
    if not body:
        return None
    pos = 0
    total = 0.0
    for match in DURATION_PART.finditer(body):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return sign * total if pos == len(body) else None


def parse_keep_alive(value: w.KeepAlive) -> float | None:
    """`keep_alive` -> seconds (None = server default, 0 = unload now, -1 = forever).

    Accepts what Ollama accepts: a number of seconds, or a Go duration string
    ("5m", "1h30m", "0"); a bare numeric string is read as seconds too. Any
    negative value means "keep loaded forever".
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRequest(f"keep_alive {value!r} is not a duration; {KEEP_ALIVE_HINT}", param="keep_alive")
    if isinstance(value, (int, float)):
        seconds: float | None = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _go_duration(text)
    if seconds is None or seconds != seconds:  # None or NaN
        raise BadRequest(f"keep_alive {value!r} is not a duration; {KEEP_ALIVE_HINT}", param="keep_alive")
    return -1.0 if seconds < 0 or seconds >= FOREVER_SECONDS else seconds  # inf, 1e300: forever


def response_format(fmt: str | dict[str, Any] | None) -> ResponseFormat:
    """`format` -> ResponseFormat: "json" (any object) or a JSON schema (validated)."""
    if fmt is None or fmt == "":
        return ResponseFormat()
    if fmt == "json":
        return ResponseFormat(type="json")
    if isinstance(fmt, dict):
        return ResponseFormat(type="json_schema", schema=fmt, name="format")
    raise BadRequest(f'format {fmt!r} is not supported; send "json" or a JSON schema object', param="format")


def decode_images(images: list[str] | None, where: str) -> list[bytes]:
    """Base64 image strings -> bytes (a `data:` URL prefix is tolerated); 400 if invalid."""
    out: list[bytes] = []
    for i, data in enumerate(images or []):
        payload = data.split(";base64,", 1)[1] if data.startswith("data:") and ";base64," in data else data
        try:
            out.append(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(
                f"{where}[{i}] is not valid base64; send each image as base64-encoded bytes (no URLs)",
                param=where,
            ) from None
    return out


# -- options -----------------------------------------------------------------------
def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


def _max_tokens(num_predict: int | None) -> int | None:
    """num_predict -> a token bound: -1 (infinite) and -2 (fill context) mean no limit."""
    if num_predict is None or num_predict < 0:
        return None
    if num_predict == 0:
        raise BadRequest("options.num_predict must be positive (or -1 for no limit); got 0",
                         param="options.num_predict")
    return num_predict


def apply_options(req: GenerateRequest, opts: w.Options | None) -> GenerateRequest:
    """Map Ollama `options` onto the request's sampling, limits and stops.

    Options hearth does not implement (mirostat, tfs_z, num_thread ...) are
    ignored and logged, as Ollama itself ignores options a runner lacks.
    """
    if opts is None:
        return req
    ignored = opts.unknown_fields()
    if ignored:
        log.info("ignoring unsupported options %s", ", ".join(ignored))
    req.sampling = Sampling(
        temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, min_p=opts.min_p,
        seed=opts.seed, presence_penalty=opts.presence_penalty, frequency_penalty=opts.frequency_penalty,
        repeat_penalty=opts.repeat_penalty, repeat_last_n=opts.repeat_last_n,
    )
    # a ceiling, not room to reserve: Ollama stops at the end of the context (done_reason "length")
    # instead of refusing a num_predict larger than what the prompt leaves
    req.max_tokens_cap = _max_tokens(opts.num_predict)
    req.stop = _stops(opts.stop)
    req.num_ctx = opts.num_ctx
    return req


# -- requests ----------------------------------------------------------------------
EFFORTS = ("low", "medium", "high", "max")


def _think(wire: w.GenerationFields) -> bool | str | None:
    """`think`: true/false, or an effort for models that take one (the engine says whether the model thinks)."""
    think = wire.think
    if think == "":
        return None
    if isinstance(think, str) and think not in EFFORTS:
        raise BadRequest(f"think must be true, false or one of {', '.join(EFFORTS)}; got {think!r}", param="think")
    return think


def _message(msg: w.ChatMessage, i: int) -> Message:
    images = decode_images(msg.images, f"messages[{i}].images")
    return Message(role=msg.role, content=msg.content or "", images=images, tool_calls=tools.calls_of(msg.tool_calls),
                   name=msg.tool_name)


def chat_request(wire: w.ChatRequest) -> GenerateRequest:
    """/api/chat body -> core GenerateRequest (empty `messages` = a load/unload request)."""
    req = GenerateRequest(
        model=wire.model,
        messages=[_message(m, i) for i, m in enumerate(wire.messages or [])],
        response_format=response_format(wire.format),
        keep_alive=parse_keep_alive(wire.keep_alive),
        tools=tools.check_tools(wire.tools),
        logprobs=logprobs_setting(wire.logprobs, wire.top_logprobs),
        think=_think(wire),
    )
    return apply_options(req, wire.options)


def _check_generate(wire: w.GenerateRequest) -> None:
    if wire.suffix:
        raise BadRequest("suffix (fill-in-the-middle) is not supported by hearth; remove `suffix`", param="suffix")
    if wire.context:
        raise BadRequest(
            "context (the deprecated token memory of /api/generate) is not supported; "
            "keep the conversation in /api/chat messages instead", param="context")
    if wire.raw:
        extra = [f for f in ("system", "template", "images") if getattr(wire, f)]
        if extra:
            raise BadRequest(
                f"raw prompts are sent to the model as-is, so {', '.join(extra)} cannot apply; "
                "put everything into the prompt or drop raw", param=extra[0])


def generate_request(wire: w.GenerateRequest) -> GenerateRequest:
    """/api/generate body -> core GenerateRequest.

    `raw` sends the prompt untouched; `template` is rendered by
    `render_template` (a small subset of Go templates) into a raw prompt;
    otherwise `system` + `prompt` (+ `images`) become a chat rendered with the
    model's own chat template. An empty prompt is a load/unload request.
    """
    _check_generate(wire)
    prompt = wire.prompt or ""
    req = GenerateRequest(model=wire.model, response_format=response_format(wire.format),
                          keep_alive=parse_keep_alive(wire.keep_alive),
                          logprobs=logprobs_setting(wire.logprobs, wire.top_logprobs), think=_think(wire))
    images = decode_images(wire.images, "images")
    if wire.raw or not (prompt or images):
        req.prompt = prompt
    elif wire.template:
        if images:
            raise BadRequest("images cannot be placed by a custom template; drop template or images",
                             param="template")
        req.prompt = render_template(wire.template, system=wire.system or "", prompt=prompt)
    else:
        system = [Message(role="system", content=wire.system)] if wire.system else []
        req.messages = [*system, Message(role="user", content=prompt, images=images)]
    return apply_options(req, wire.options)


def is_load_request(req: GenerateRequest) -> bool:
    """True when there is nothing to generate from: the request only loads/unloads."""
    if req.messages is not None:
        return not req.messages
    return not req.prompt


def embed_request(wire: w.EmbedRequest) -> EmbedRequest:
    """/api/embed body -> EmbedRequest (no inputs = just load the model)."""
    inputs = ([wire.input] if wire.input else []) if isinstance(wire.input, str) else list(wire.input)
    if wire.options is not None and wire.options.unknown_fields():
        log.info("ignoring options %s on /api/embed", ", ".join(wire.options.unknown_fields()))
    return EmbedRequest(model=wire.model, inputs=inputs, dimensions=wire.dimensions,
                        truncate=True if wire.truncate is None else wire.truncate,
                        keep_alive=parse_keep_alive(wire.keep_alive))


def embeddings_request(wire: w.EmbeddingsRequest) -> EmbedRequest:
    """Legacy /api/embeddings body -> EmbedRequest (one prompt; truncated like Ollama)."""
    return EmbedRequest(model=wire.model, inputs=[wire.prompt] if wire.prompt else [], truncate=True,
                        keep_alive=parse_keep_alive(wire.keep_alive))


# -- responses ---------------------------------------------------------------------
def timings(usage: Usage, total_ns: int) -> dict[str, int]:
    """Usage -> Ollama's count and nanosecond timing fields."""
    return {
        "total_duration": max(total_ns, usage.total_ns),
        "load_duration": usage.load_ns,
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": usage.prompt_ns,
        "eval_count": usage.completion_tokens,
        "eval_duration": usage.generate_ns,
    }


def tool_call_body(call: ToolCall, index: int) -> dict[str, Any]:
    """A tool call as Ollama sends it: arguments as an object."""
    arguments = tools.arguments_object(call)
    if arguments is None:
        raise UpstreamError(f"the model called {call.name!r} with arguments that are not a JSON object: "
                            f"{call.arguments[:120]!r}", code="invalid_tool_call")
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": arguments}}


def chunk_body(kind: str, model: str, created_at: str, text: str,
               calls: list[ToolCall] | tuple[ToolCall, ...] = (), first: int = 0,
               logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...] | None = None,
               thinking: str = "") -> dict[str, Any]:
    """One streamed piece of /api/chat (`kind="chat"`) or /api/generate output.

    `calls` are tool calls (chat only); `first` is the index of the first of them in the answer;
    `logprobs` are those of this piece's tokens (None when not asked for); `thinking` is a
    thinking model's reasoning.
    """
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = [tool_call_body(c, first + k) for k, c in enumerate(calls)]
        body = {"model": model, "created_at": created_at, "message": message, "done": False}
    else:
        body = {"model": model, "created_at": created_at, "response": text, "done": False}
        if thinking:
            body["thinking"] = thinking
    if logprobs is not None:
        body["logprobs"] = logprob_entries(logprobs)
    return body


def final_body(kind: str, model: str, created_at: str, text: str, finish: str | None,
               usage: Usage, total_ns: int, calls: list[ToolCall] | None = None,
               logprobs: list[TokenLogprob] | None = None, thinking: str = "") -> dict[str, Any]:
    """The last object of a generation (or the only one with stream=false)."""
    body = chunk_body(kind, model, created_at, text, calls or (), logprobs=logprobs, thinking=thinking)
    body["done"] = True
    body["done_reason"] = DONE_REASON.get(finish or "stop", "stop")
    body.update(timings(usage, total_ns))
    return body


def load_body(kind: str, model: str, created_at: str, reason: str, load_ns: int, total_ns: int) -> dict[str, Any]:
    """The answer to an empty prompt/messages: `done_reason` "load" or "unload"."""
    body = chunk_body(kind, model, created_at, "")
    body.update(done=True, done_reason=reason, load_duration=load_ns, total_duration=total_ns)
    return body


def embed_body(model: str, result: EmbedResult | None, total_ns: int) -> dict[str, Any]:
    """/api/embed response (`result` None = nothing to embed, model only loaded)."""
    if result is None:
        return {"model": model, "embeddings": [], "total_duration": total_ns, "load_duration": 0,
                "prompt_eval_count": 0}
    return {"model": model, "embeddings": result.vectors, "total_duration": max(total_ns, result.total_ns),
            "load_duration": result.load_ns, "prompt_eval_count": result.prompt_tokens}


def embeddings_body(result: EmbedResult | None) -> dict[str, Any]:
    """Legacy /api/embeddings response: one vector (empty for an empty prompt)."""
    return {"embedding": result.vectors[0] if result and result.vectors else []}


def error_body(message: str) -> dict[str, str]:
    """Ollama's error envelope (also a line of an NDJSON stream)."""
    return {"error": message}


# -- model descriptions ------------------------------------------------------------
def parameter_size(info: ModelInfo) -> str:
    """"270M", "7.6B": GGUF `size_label` when known, else from the parameter count."""
    label = info.metadata.get("size_label") or info.metadata.get("general.size_label")
    if label:
        return str(label)
    n = info.parameter_count
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.0f}M"
    if n >= 1_000:
        return f"{n / 1e3:.0f}K"
    return str(n) if n else ""


def details(info: ModelInfo) -> dict[str, Any]:
    """The `details` object of /api/tags, /api/show and /api/ps."""
    family = info.family or info.architecture
    return {
        "parent_model": "",
        "format": "gguf" if (info.path or "").endswith(".gguf") or info.quantization else "",
        "family": family,
        "families": [family] if family else [],
        "parameter_size": parameter_size(info),
        "quantization_level": info.quantization,
    }


def tag_body(info: ModelInfo) -> dict[str, Any]:
    """One entry of /api/tags."""
    return {
        "name": info.id,
        "model": info.id,
        "modified_at": rfc3339(info.created),
        "size": info.size_bytes,
        "digest": info.digest,
        "details": details(info),
    }


def _json_value(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    return isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value)


def model_info(info: ModelInfo) -> dict[str, Any]:
    """GGUF key/values (dotted keys only; hearth's own notes are left out)."""
    out = {k: v for k, v in sorted(info.metadata.items()) if "." in k and _json_value(v)}
    if info.architecture:
        out.setdefault("general.architecture", info.architecture)
    if info.parameter_count:
        out.setdefault("general.parameter_count", info.parameter_count)
    return out


def parameters_text(info: ModelInfo) -> str:
    """Modelfile-style `parameters`: the settings hearth applies (an Ollama upstream's own, as it says)."""
    own = info.metadata.get("parameters")
    if isinstance(own, str):
        return own
    return f"num_ctx                        {info.context_length}" if info.context_length else ""  # 0: unknown


def show_body(info: ModelInfo) -> dict[str, Any]:
    """/api/show: details, GGUF `model_info`, chat template, parameters, capabilities.

    `template` is the model's own chat template (Jinja, as stored in the GGUF),
    not a Go template; hearth renders it itself.
    """
    return {
        "modelfile": f"# Modelfile generated by hearth\nFROM {info.path or info.id}\n"
                     + (f"PARAMETER num_ctx {info.context_length}\n" if info.context_length else ""),
        "parameters": parameters_text(info),
        "template": info.chat_template or "",
        "license": str(info.metadata.get("general.license", "")),
        "details": details(info),
        "model_info": model_info(info),
        "capabilities": list(info.capabilities),
        "modified_at": rfc3339(info.created),
    }


def ps_body(loaded: LoadedModel, info: ModelInfo | None, now: float) -> dict[str, Any]:
    """One entry of /api/ps (a model held in memory, with its expiry)."""
    expires = now + FOREVER_SECONDS if loaded.expires_at is None else loaded.expires_at
    return {
        "name": loaded.id,
        "model": loaded.id,
        "size": loaded.size_bytes,
        "digest": info.digest if info else "",
        "details": details(info) if info else {},
        "expires_at": rfc3339(expires),
        "size_vram": 0,
        "context_length": loaded.context_length,
    }
