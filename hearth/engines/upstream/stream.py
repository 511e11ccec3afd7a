"""State shared by the per-dialect parsers of an upstream's streamed answer."""

from __future__ import annotations

from typing import Any

import orjson

from hearth.core.errors import UpstreamError
from hearth.core.types import TokenLogprob, ToolCall, Usage


class StreamParser:
    """Text, finish reason and usage of one upstream stream.

    Subclasses say which part of a line is a JSON event (`payload`, or
    `payloads` for all lines of a read at once) and what an event means
    (`event`); `feed` parses all lines of one read in one go.
    """

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.done = False
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.pieces = 0
        self.calls: list[ToolCall] = []
        self.calls_seen = False  # a tool call has begun (progress, for the idle timeout)
        self.logprobs: list[TokenLogprob] = []  # of text not handed out yet
        self.logprobs_seen = False
        self.thinking: list[str] = []  # reasoning text not handed out yet
        self.refusal: list[str] = []  # a refusal's pieces (handed out whole, at the end)

    def payload(self, line: bytes) -> bytes | None:
        """The JSON of one line; None for lines without one (may set `done`)."""
        raise NotImplementedError

    def event(self, event: dict[str, Any]) -> str:
        """Take in one event; returns the text it carries ("" for none)."""
        raise NotImplementedError

    def payloads(self, lines: list[bytes]) -> list[bytes]:
        """The JSON of each line that carries one, up to the end marker (subclasses may do it in one loop)."""
        payloads = []
        for line in lines:
            if not line or line == b"\r":  # event separators carry nothing
                continue
            payload = self.payload(line)
            if payload:
                payloads.append(payload)
            if self.done:
                break
        return payloads

    def feed(self, lines: list[bytes]) -> str:
        """The text of complete lines (those of one read), up to the end of the stream."""
        payloads = self.payloads(lines)
        if not payloads:
            return ""
        try:
            events = list(map(orjson.loads, payloads))  # no Python call per line: this is per request
        except orjson.JSONDecodeError:
            bad = next(p for p in payloads if not _parses(p))
            raise UpstreamError(f"sent a stream line that is not JSON: {bad[:120]!r}") from None
        marked = self.done  # an end marker line (`[DONE]`) came after these events
        texts = []
        for event in events:
            if type(event) is not dict:
                raise UpstreamError(f"sent a stream event that is not a JSON object: {orjson.dumps(event)[:120]!r}")
            text = self.event(event)
            if text:
                self.pieces += 1
                texts.append(text)
            if self.done and not marked:  # this event ended the stream: what follows is not part of it
                break
        return "".join(texts)

    def tool_calls(self) -> list[ToolCall]:
        """The tool calls the stream made, whole."""
        return self.calls

    def take_logprobs(self, top: int | None) -> tuple[TokenLogprob, ...]:
        """Log probabilities that came since the last call (they go with the text of the same reads),
        with at most `top` alternatives each (an upstream may have been asked for more)."""
        out, self.logprobs = tuple(self.logprobs), []
        if top is not None:
            for e in out:
                del e.top[top:]
        return out

    def take_thinking(self) -> str:
        """Reasoning text that came since the last call."""
        out, self.thinking = "".join(self.thinking), []
        return out

    def add_logprobs(self, entries: Any) -> None:
        """Entries shaped `{token, logprob, bytes?, top_logprobs?: [{token, logprob, bytes?}]}`
        (OpenAI chat and Ollama alike)."""
        if not isinstance(entries, list):
            raise UpstreamError(f"sent logprobs that are not a list: {entries!r:.120}")
        for e in entries:
            one = _entry(e)
            one.top = [_entry(a) for a in (e.get("top_logprobs") or [])]
            self.logprobs.append(one)
        self.logprobs_seen = True

    def final_usage(self) -> Usage:
        """Usage reported by the upstream, or pieces counted when it sent none."""
        return self.usage or Usage(completion_tokens=self.pieces)


def _entry(e: Any) -> TokenLogprob:
    if not isinstance(e, dict) or not isinstance(e.get("token"), str) or \
            not isinstance(e.get("logprob"), (int, float)):
        raise UpstreamError(f"sent a logprobs entry without token and logprob: {e!r:.120}")
    raw = e.get("bytes")
    return TokenLogprob(token=e["token"], logprob=float(e["logprob"]),
                        bytes=list(raw) if isinstance(raw, list) else list(e["token"].encode()))


def _parses(payload: bytes) -> bool:
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return True
