"""What happened in one request, for usage records and metrics (never content).

The HTTP layer opens a `RequestRecord` per request (`open_record`) in a
context variable; the serving code notes the model, engine and token counts
as they become known; whoever opened it (auth/usage middleware) persists it.
With no record open, the `note_*` calls do nothing.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field

from hearth.core.types import ModelInfo, Usage

_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("hearth_record", default=None)


@dataclass
class RequestRecord:
    """Counts and timings of one request."""

    route: str = ""
    dialect: str = ""
    request_id: str = ""  # X-Request-Id: the client's, or hearth's own; in logs and sent upstream
    key_name: str | None = None
    model: str | None = None
    engine: str | None = None
    cloud: bool = False  # the request was sent to a cloud upstream (prompts left the box)
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    started_ns: int = field(default_factory=time.perf_counter_ns)
    first_token_ns: int | None = None
    finished_ns: int | None = None
    started_at: float = field(default_factory=time.time)

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_ns is None:
            return None
        return (self.first_token_ns - self.started_ns) / 1e6

    @property
    def duration_ms(self) -> float:
        end = self.finished_ns or time.perf_counter_ns()
        return (end - self.started_ns) / 1e6


def open_record(route: str, dialect: str) -> tuple[RequestRecord, contextvars.Token[RequestRecord | None]]:
    """Start recording the current request; returns the record and a reset token."""
    rec = RequestRecord(route=route, dialect=dialect)
    return rec, _current.set(rec)


def close_record(token: contextvars.Token[RequestRecord | None]) -> None:
    """Stop recording (the caller keeps the record object)."""
    _current.reset(token)


def current() -> RequestRecord | None:
    """The record of the request being served, if any."""
    return _current.get()


def dialect() -> str:
    """The dialect of the request being served ("openai", "ollama"; "" outside a request): for
    messages that name the field or fix in the caller's own terms."""
    rec = _current.get()
    return rec.dialect if rec is not None else ""


def note_model(info: ModelInfo) -> None:
    rec = _current.get()
    if rec is not None:
        rec.model = info.id
        rec.engine = info.engine
        rec.cloud = bool(info.metadata.get("cloud"))


def note_first_token() -> None:
    rec = _current.get()
    if rec is not None and rec.first_token_ns is None:
        rec.first_token_ns = time.perf_counter_ns()


def note_usage(usage: Usage) -> None:
    """Add one generation's usage (several for n > 1 or several prompts)."""
    rec = _current.get()
    if rec is not None:
        rec.prompt_tokens += usage.prompt_tokens
        rec.completion_tokens += usage.completion_tokens
        rec.cached_tokens += usage.cached_tokens
        rec.finished_ns = time.perf_counter_ns()
