"""Ollama wire models (requests). Unknown fields are kept and logged, not rejected.

Field names and shapes follow `specs/ollama-openapi.yaml`. Values that need
interpretation (keep_alive durations, `format`, base64 images, `options`) are
left loose here and checked in `convert.py`, so that a bad value gets a 400
that says how to fix it rather than a bare type error.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

KeepAlive = str | float | int | None


class Wire(BaseModel):
    """Base for wire models: extra fields allowed (clients send vendor extras)."""

    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        """Names of fields the client sent that hearth does not know."""
        return sorted((self.model_extra or {}).keys())


class Options(Wire):
    """Runtime options (`options`); the ones hearth maps are typed, others are logged."""

    num_ctx: int | None = Field(default=None, ge=1)
    num_predict: int | None = None
    temperature: float | None = Field(default=None, ge=0.0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(default=None, ge=0.0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class ToolCallFunction(Wire):
    name: str
    arguments: dict[str, Any] | str | None = None


class ToolCall(Wire):
    id: str | None = None
    function: ToolCallFunction


class ChatMessage(Wire):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class GenerationFields(Wire):
    """Fields shared by /api/chat and /api/generate."""

    model: str = Field(min_length=1)
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    keep_alive: KeepAlive = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, value: Any) -> Any:
        return True if value is None else value  # as Ollama reads a null stream: the default


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(GenerationFields):
    prompt: str | None = None
    suffix: str | None = None
    images: list[str] | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    context: list[int] | None = None

    @field_validator("raw", mode="before")
    @classmethod
    def _null_raw(cls, value: Any) -> Any:
        return False if value is None else value


class EmbedRequest(Wire):
    model: str = Field(min_length=1)
    input: str | list[str]
    truncate: bool | None = None
    dimensions: int | None = Field(default=None, ge=1)
    keep_alive: KeepAlive = None
    options: Options | None = None


class EmbeddingsRequest(Wire):
    """The legacy /api/embeddings body: one `prompt`, one vector back."""

    model: str = Field(min_length=1)
    prompt: str = ""
    keep_alive: KeepAlive = None
    options: Options | None = None


class ShowRequest(Wire):
    """`model` (older clients send `name`)."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False

    def model_name(self) -> str:
        """The model asked about, whichever field carried it."""
        return self.model or self.name or ""
