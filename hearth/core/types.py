"""Dialect-neutral request and result types.

Every API dialect converts its wire format into these and back; every engine
consumes and produces only these. Nothing here knows about HTTP or llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "cancelled", "error"]


@dataclass(slots=True)
class ToolCall:
    """A function call the model asks for. `arguments` is JSON text, as the OpenAI API carries it."""

    name: str
    arguments: str = "{}"
    id: str = ""


@dataclass(slots=True)
class Message:
    """One chat turn. `images` holds raw image bytes for vision models.

    An assistant turn may carry `tool_calls`; a `tool` turn answers one, named
    by `tool_call_id` (OpenAI) or by the function `name` (Ollama).
    """

    role: Role
    content: str
    images: list[bytes] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(slots=True)
class Sampling:
    """Sampling parameters. `None` means "the engine's default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass(slots=True)
class ResponseFormat:
    """Structured output: `json` (any JSON object) or `json_schema` (validated)."""

    type: Literal["text", "json", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool = True


@dataclass(slots=True)
class GenerateRequest:
    """A text generation request: chat `messages` or a raw `prompt`.

    Exactly one of `messages` and `prompt` is set. `raw` prompts skip any
    template; a chat request is rendered with the model's chat template.
    """

    model: str
    messages: list[Message] | None = None
    prompt: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int | None = None
    max_tokens_cap: int | None = None  # a bound, not a reservation: Ollama's num_predict, or the server's cap
    stop: list[str] = field(default_factory=list)
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    num_ctx: int | None = None
    user: str | None = None
    keep_alive: float | None = None  # seconds; None = default, <0 = forever
    request_id: str = ""
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-style function tools
    tool_choice: str | dict[str, Any] | None = None  # "auto", "none", "required" or a named function
    parallel_tool_calls: bool | None = None
    logprobs: int | None = None  # None: off; N: each token's log probability and the N likeliest alternatives
    think: bool | str | None = None  # thinking models: on/off, or an effort ("low", "medium", "high")

    @property
    def uses_tools(self) -> bool:
        """True when the model may call tools or the history holds tool calls."""
        if self.tools and self.tool_choice != "none":
            return True
        for m in self.messages or ():
            if m.tool_calls:
                return True
        return False

    @property
    def is_chat(self) -> bool:
        """True for a chat (messages) request, False for a raw prompt."""
        return self.messages is not None


@dataclass(slots=True)
class Usage:
    """Token counts and timings of one generation (timings in nanoseconds)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    load_ns: int = 0
    prompt_ns: int = 0
    generate_ns: int = 0
    total_ns: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class TokenLogprob:
    """A generated token (its text and bytes), its log probability, and the likeliest alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class Chunk:
    """A piece of a generation. The last chunk has `finish_reason` and `usage`.

    `tool_calls` are whole calls (never argument fragments). `logprobs` (when
    asked for) are those of the tokens whose text is in this chunk. `thinking`
    is reasoning text a thinking model sends apart from its answer; `refusal` a
    cloud model's reason for not answering (it comes whole, in the last chunk).
    """

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    thinking: str = ""  # a thinking model's reasoning, apart from the answer
    refusal: str = ""  # why the model declined to answer (OpenAI's `refusal`), in place of the answer


@dataclass(slots=True)
class EmbedRequest:
    """Embed one or more texts. `dimensions` asks for a shorter vector."""

    model: str
    inputs: list[str]
    dimensions: int | None = None
    truncate: bool = False
    keep_alive: float | None = None
    request_id: str = ""


@dataclass(slots=True)
class EmbedResult:
    """L2-normalised vectors, one per input, in input order."""

    vectors: list[list[float]]
    prompt_tokens: int
    model: str
    total_ns: int = 0
    load_ns: int = 0


@dataclass(slots=True)
class ModelInfo:
    """What hearth knows about a model it can serve."""

    id: str
    engine: str
    context_length: int
    created: int = 0
    owned_by: str = "hearth"
    embedding_dimension: int | None = None
    embedding_dimensions: list[int] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=lambda: ["completion"])
    architecture: str = ""
    family: str = ""
    parameter_count: int = 0
    quantization: str = ""
    size_bytes: int = 0
    digest: str = ""
    chat_template: str | None = None
    path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)


@dataclass(slots=True)
class LoadedModel:
    """A model currently held in memory by an engine."""

    id: str
    size_bytes: int
    context_length: int
    expires_at: float | None  # unix time; None = never
