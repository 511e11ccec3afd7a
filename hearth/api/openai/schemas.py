"""OpenAI wire models (requests). Unknown fields are kept and logged, not rejected."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class Wire(BaseModel):
    """Base for wire models: extra fields allowed (clients send vendor extras)."""

    model_config = ConfigDict(extra="allow")

    handled_extras: ClassVar[frozenset[str]] = frozenset()  # read from the extras (refused with a reason)

    def unknown_fields(self) -> list[str]:
        """Names of fields the client sent that hearth does not know."""
        extra = self.__pydantic_extra__
        return sorted(set(extra) - self.handled_extras) if extra else []


class ImageURL(Wire):
    url: str
    detail: str | None = None


class ContentPart(Wire):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(Wire):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCall(Wire):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(Wire):
    include_usage: bool = False


class JSONSchemaFormat(Wire):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class SamplingFields(Wire):
    """Fields shared by chat and legacy completions (plus llama.cpp extras)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(default=None, ge=0.0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=16)
    user: str | None = None
    stream: bool = False

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """The spec lets `n` and `stream` be null (SDKs and proxies send that): the default then."""
        return cls.model_fields[str(info.field_name)].default if value is None else value
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    echo: bool | None = None


class ChatCompletionRequest(SamplingFields):
    handled_extras: ClassVar[frozenset[str]] = frozenset({"modalities", "audio", "web_search_options"})

    messages: list[ChatMessage] = Field(min_length=1)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None


class EmbeddingRequest(Wire):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("encoding_format", mode="before")
    @classmethod
    def _null_is_float(cls, value: Any) -> Any:
        """null is the default, as for `n` and `stream`."""
        return "float" if value is None else value
