"""Pure converters: OpenAI wire <-> core types. No I/O here."""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import orjson

from hearth.api.common import logprob_entries, logprobs_setting
from hearth.api.openai import schemas as w
from hearth.core import tools
from hearth.core.errors import BadRequest, HearthError
from hearth.core.types import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    Message,
    ModelInfo,
    ResponseFormat,
    Sampling,
    TokenLogprob,
    ToolCall,
    Usage,
)

FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "content_filter": "content_filter",
          "cancelled": "stop", "error": "stop"}


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    return [s for s in stops if s]


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise BadRequest(f"logit_bias key {key!r} is not a token id (an integer)", param="logit_bias") from None
    return out


def _sampling(req: w.SamplingFields) -> Sampling:
    return Sampling(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repeat_penalty=req.repeat_penalty,
        logit_bias=_logit_bias(req.logit_bias) if req.logit_bias else {},
    )


def _response_format(rf: w.ResponseFormat | None) -> ResponseFormat:
    if rf is None or rf.type == "text":
        return ResponseFormat()
    if rf.type == "json_object":
        return ResponseFormat(type="json")
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise BadRequest(
            "response_format.json_schema.schema is required when type is json_schema",
            param="response_format.json_schema",
        )
    js = rf.json_schema
    return ResponseFormat(type="json_schema", schema=js.schema_, name=js.name, strict=js.strict is not False)


def _image(part: w.ContentPart, where: str) -> bytes:
    url = part.image_url.url if part.image_url else ""
    if not url.startswith("data:") or ";base64," not in url:
        raise BadRequest(
            f"{where}: only inline images (data:image/...;base64,...) are accepted; "
            "hearth does not fetch URLs",
            param=where,
        )
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except ValueError:
        raise BadRequest(f"{where}: image data is not valid base64", param=where) from None


def _message(msg: w.ChatMessage, i: int) -> Message:
    role = "system" if msg.role == "developer" else msg.role
    if msg.content is None or isinstance(msg.content, str):
        out = Message(role=role, content=msg.content or "")
    else:
        texts: list[str] = []
        images: list[bytes] = []
        for j, part in enumerate(msg.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                texts.append(part.text or "")
            elif part.type == "image_url":
                images.append(_image(part, where))
            else:
                raise BadRequest(f"{where}: content part type {part.type!r} is not supported; use text", param=where)
        out = Message(role=role, content="\n".join(texts), images=images)
    if msg.tool_calls:
        out.tool_calls = tools.calls_of(msg.tool_calls)
    # a participant's name (several users in one chat): OpenAI-compatible upstreams get it; the in-box
    # templates, as llama-server's and Ollama's, have no place for it
    out.name = msg.name
    if role == "tool":
        out.tool_call_id = msg.tool_call_id
    return out


def _reject_unsupported(req: w.SamplingFields) -> None:
    if req.echo:
        raise BadRequest("echo is a completions parameter; remove `echo`", param="echo")


def _chat_logprobs(req: w.ChatCompletionRequest) -> int | None:
    """Chat's `logprobs: true` and `top_logprobs: 0-20` -> how many alternatives (None: off)."""
    if req.logprobs is not None and not isinstance(req.logprobs, bool):
        raise BadRequest("logprobs is true or false in chat completions; the number of alternatives "
                         "goes in top_logprobs (0-20)", param="logprobs")
    return logprobs_setting(req.logprobs, req.top_logprobs)


def _completion_logprobs(req: w.CompletionRequest) -> int | None:
    """Legacy completions' `logprobs: 0-5` (how many alternatives) -> the same (None: off)."""
    value = req.logprobs
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not 0 <= value <= 5:
        raise BadRequest(f"logprobs is a number of alternatives from 0 to 5 in completions, got {value!r}",
                         param="logprobs")
    return value


def _reject_unsupported_extras(extra: dict[str, Any]) -> None:
    """Fields that, ignored, would make an answer look like something it is not."""
    modalities = extra.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise BadRequest(f"modalities {modalities!r}: hearth's models answer in text only; "
                         'drop `modalities` or send ["text"]', param="modalities")
    if extra.get("audio") is not None:
        raise BadRequest("audio output is not supported: hearth's models answer in text only; drop `audio`",
                         param="audio")
    if extra.get("web_search_options") is not None:
        raise BadRequest("hearth does no web search (prompts stay on this machine); drop `web_search_options`",
                         param="web_search_options")


def chat_request(req: w.ChatCompletionRequest) -> GenerateRequest:
    """OpenAI chat request -> core GenerateRequest."""
    _reject_unsupported(req)
    extra = req.model_extra
    if extra:
        for old, new in (("functions", "tools"), ("function_call", "tool_choice")):
            if extra.get(old) is not None:  # ignoring them would answer as if no function existed
                raise BadRequest(f"`{old}` is the deprecated form of `{new}`; send `{new}` instead "
                                 '(each function as {"type": "function", "function": {...}})', param=old)
        _reject_unsupported_extras(extra)
    if req.tools is None and req.tool_choice is None:  # most requests: nothing to check
        tool_list: list[dict[str, Any]] = []
        choice = None
    else:
        tool_list = tools.check_tools(req.tools)
        choice = tools.check_tool_choice(req.tool_choice, tool_list)
    return GenerateRequest(
        model=req.model or "",
        messages=[_message(m, i) for i, m in enumerate(req.messages)],
        sampling=_sampling(req),
        max_tokens=req.max_completion_tokens or req.max_tokens,
        stop=_stop_list(req.stop),
        response_format=_response_format(req.response_format),
        user=req.user,
        tools=tool_list,
        tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls,
        logprobs=None if req.logprobs is None and req.top_logprobs is None else _chat_logprobs(req),
        think=False if req.reasoning_effort == "none" else req.reasoning_effort,
    )


def completion_prompts(req: w.CompletionRequest) -> list[str]:
    """The prompt strings of a legacy completion request."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        if not prompt:
            raise BadRequest("prompt must not be an empty list", param="prompt")
        return list(prompt)  # type: ignore[arg-type]
    raise BadRequest("token-id prompts are not supported; send the prompt as text", param="prompt")


def completion_request(req: w.CompletionRequest, prompt: str) -> GenerateRequest:
    """OpenAI legacy completion (one prompt) -> core GenerateRequest (`echo` is applied by the route)."""
    if req.echo and req.logprobs is not None and req.logprobs is not False:
        raise BadRequest("echo with logprobs (scoring the prompt) is not supported; drop one of them",
                         param="echo")
    if req.suffix:
        raise BadRequest("suffix (fill-in-the-middle) is not supported; remove `suffix`", param="suffix")
    if req.best_of is not None and req.best_of != req.n:  # = n: all are returned, which is what n does
        raise BadRequest(f"best_of {req.best_of} is not supported (hearth does not rank samples); drop it or "
                         f"set it to n ({req.n})", param="best_of")
    return GenerateRequest(
        model=req.model or "",
        prompt=prompt,
        sampling=_sampling(req),
        max_tokens=req.max_tokens if req.max_tokens is not None else 16,
        stop=_stop_list(req.stop),
        response_format=_response_format(req.response_format),
        user=req.user,
        logprobs=_completion_logprobs(req),
    )


def embed_request(req: w.EmbeddingRequest) -> EmbedRequest:
    """OpenAI embeddings request -> core EmbedRequest."""
    inputs = [req.input] if isinstance(req.input, str) else req.input
    if not inputs:
        raise BadRequest("input must not be empty", param="input")
    if not all(isinstance(x, str) for x in inputs):
        raise BadRequest("token-id inputs are not supported; send text", param="input")
    if any(not x for x in inputs):  # the spec: "cannot be an empty string" (it would embed BOS alone)
        raise BadRequest("input must not contain an empty string", param="input")
    return EmbedRequest(model=req.model or "", inputs=list(inputs), dimensions=req.dimensions)  # type: ignore[arg-type]


def usage_body(usage: Usage | None) -> dict[str, Any]:
    """Core Usage -> OpenAI `usage` object."""
    u = usage or Usage()
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def tool_call_body(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A tool call as OpenAI sends it (`index` only in stream deltas)."""
    body: dict[str, Any] = {"id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": call.arguments}}
    if index is not None:
        body = {"index": index, **body}
    return body


def chat_choice(index: int, text: str, finish: str | None, calls: list[ToolCall] | None = None,
                logprobs: list[TokenLogprob] | None = None, thinking: str = "", refusal: str = "") -> dict[str, Any]:
    """One non-streamed chat choice (content is null when the model only called tools or refused, as
    OpenAI does; a thinking model's reasoning is `reasoning_content`, as vLLM and DeepSeek send it)."""
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not refusal else None,
                               "refusal": refusal or None, "annotations": []}
    if thinking:
        message["reasoning_content"] = thinking
    if calls:
        message["content"] = text or None
        message["tool_calls"] = [tool_call_body(c) for c in calls]
    return {
        "index": index,
        "message": message,
        "logprobs": chat_logprobs(logprobs),
        "finish_reason": FINISH.get(finish or "stop", "stop"),
    }


def chat_logprobs(entries: list[TokenLogprob] | tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    """Log probabilities as a chat choice carries them (None when not asked for)."""
    if entries is None:
        return None
    return {"content": logprob_entries(entries), "refusal": None}


def completion_logprobs(entries: list[TokenLogprob] | tuple[TokenLogprob, ...] | None,
                        offset: int = 0) -> dict[str, Any] | None:
    """Log probabilities in the legacy completions shape; `offset` is where this text starts in the answer."""
    if entries is None:
        return None
    offsets = []
    for t in entries:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in entries], "token_logprobs": [t.logprob for t in entries],
            "top_logprobs": [{a.token: a.logprob for a in t.top} for t in entries], "text_offset": offsets}


def chat_response(rid: str, model: str, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    """A `chat.completion` object."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_body(usage),
        "system_fingerprint": "hearth",
        "service_tier": "default",
    }


class ChatChunks:
    """The `chat.completion.chunk` server-sent events of one stream.

    What every chunk of a stream shares (id, created, model ...) is rendered
    once; each event renders only its delta. The bytes are those of orjson
    on the whole chunk object, for less work per event.
    """

    def __init__(self, rid: str, created: int, model: str, include_usage: bool = False) -> None:
        self.rid, self.created, self.model = rid, created, model
        shared = orjson.dumps({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "system_fingerprint": "hearth"})
        self._head = b"data: " + shared[:-1] + b',"choices":[{"index":'
        # with include_usage every chunk has `usage`, null until the last one (the spec's wording)
        self._tail = b'}],"usage":null}\n\n' if include_usage else b"}]}\n\n"

    def event(self, index: int, delta: dict[str, Any], finish: str | None,
              logprobs: dict[str, Any] | None = None) -> bytes:
        """One event: choice `index`'s `delta`, and its finish reason on the last one."""
        reason = orjson.dumps(FINISH.get(finish, "stop")) if finish else b"null"
        return b'%s%d,"delta":%s,"logprobs":%s,"finish_reason":%s%s' % (
            self._head, index, orjson.dumps(delta), orjson.dumps(logprobs), reason, self._tail)


def usage_chunk(rid: str, created: int, model: str, obj: str, usage: Usage) -> dict[str, Any]:
    """The final stream chunk carrying usage and no choices."""
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": "hearth",
        "choices": [],
        "usage": usage_body(usage),
    }


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One legacy completion choice."""
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": FINISH.get(finish or "stop", "stop") if finish is not None else None,
    }


def completion_response(
    rid: str, created: int, model: str, choices: list[dict[str, Any]], usage: Usage | None
) -> dict[str, Any]:
    """A `text_completion` object (or stream chunk when usage is None)."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": "hearth",
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage_body(usage)
    return body


def _b64(vec: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")


def embed_response(result: EmbedResult, encoding: str) -> dict[str, Any]:
    """Core EmbedResult -> OpenAI `list` of embeddings."""
    data = [
        {"object": "embedding", "index": i, "embedding": _b64(v) if encoding == "base64" else v}
        for i, v in enumerate(result.vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


def model_body(info: ModelInfo, model_id: str | None = None) -> dict[str, Any]:
    """A `model` object, with hearth's extra facts (context, dimension)."""
    body: dict[str, Any] = {
        "id": model_id or info.id,
        "object": "model",
        "created": info.created,
        "owned_by": info.owned_by,
        "capabilities": info.capabilities,
    }
    if info.context_length:  # 0 = unknown (an Ollama upstream sets it per request): not claimed
        body["context_length"] = info.context_length
    if info.embedding_dimension:
        body["embedding_dimension"] = info.embedding_dimension
        body["embedding_dimensions"] = info.embedding_dimensions or [info.embedding_dimension]
    if info.aliases:
        body["aliases"] = info.aliases
    return body


def error_body(err: HearthError) -> dict[str, Any]:
    """OpenAI error envelope."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
