"""State shared by the per-dialect parsers of an upstream's streamed answer."""

from __future__ import annotations

from typing import Any

import orjson

from hearth.core.errors import UpstreamError
from hearth.core.types import Usage


class StreamParser:
    """Text, finish reason and usage of one upstream stream; subclasses parse lines."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.done = False
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.pieces = 0

    @staticmethod
    def load(payload: bytes) -> Any:
        """One JSON event, or an UpstreamError naming the bad line."""
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"sent a stream line that is not JSON: {payload[:120]!r}") from None

    def final_usage(self) -> Usage:
        """Usage reported by the upstream, or pieces counted when it sent none."""
        return self.usage or Usage(completion_tokens=self.pieces)
