"""A generation that turns the model's call text into tool calls, streaming the rest.

Text streams as it comes until a call may be starting (a marker, or JSON at
the very start of the answer); from there on it is held until the end and
parsed. Well-formed calls end the answer with `finish_reason: "tool_calls"`;
anything else is sent as the text it was, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from hearth.core.structured import StructuredOutputError, output_problem
from hearth.core.types import Chunk, ResponseFormat, TokenLogprob
from hearth.engines.llamacpp import tool_calls


class ToolCallGeneration:
    """Wraps an in-box generation of a request that offers tools."""

    def __init__(self, inner: Any, names: set[str], forced: bool,
                 strict: dict[str, dict[str, Any]] | None = None) -> None:
        self.inner = inner
        self.prompt_tokens: int = inner.prompt_tokens
        self.names = names
        self.forced = forced  # the grammar makes the whole answer calls: hold all of it
        self.strict = strict or {}  # name -> parameters of each `strict: true` function
        self.held: list[TokenLogprob] = []  # log probabilities of text not sent yet (when asked for)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._run()

    async def _run(self) -> AsyncIterator[Chunk]:
        pending = ""  # text not sent yet
        capturing = self.forced
        sent = False
        async for chunk in self.inner:
            self.held.extend(chunk.logprobs)
            if chunk.text:
                pending += chunk.text
                if not capturing and (sent or pending.strip()):  # leading space: wait to see what follows
                    start = tool_calls.call_start(pending, at_start=not sent)
                    if start >= 0:
                        capturing = True
                        out, pending = pending[:start], pending[start:]
                    else:
                        keep = tool_calls.held_back(pending)
                        out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
                    if out:
                        sent = True
                        yield Chunk(text=out, logprobs=self._take())
            if chunk.finish_reason is not None:
                for out in self._finish(pending, chunk):
                    yield out
                return

    def _finish(self, pending: str, last: Chunk) -> list[Chunk]:
        parsed = tool_calls.parse(pending, self.names) if pending else None
        cut_off = False
        if parsed is None and last.finish_reason == "length" and (cut := pending.rfind("<tool_call>")) > 0:
            # parallel calls cut off in a further one: the whole calls before it stand, and the finish
            # says the answer was cut (finish_reason "length")
            parsed = tool_calls.parse(pending[:cut].rstrip(), self.names)
            cut_off = parsed is not None
        if parsed is None:
            if self.forced:
                if last.finish_reason == "length":
                    raise StructuredOutputError(
                        "finish_reason=length: generation hit the token limit in the middle of a tool call; "
                        "raise max_tokens (or num_predict) and retry", code="tool_call_incomplete")
                raise StructuredOutputError(f"the model's tool call could not be read: {pending[:200]!r}",
                                            code="tool_call_invalid")
            return [Chunk(text=pending, logprobs=self._take()), last] if pending else [last]
        before, calls = parsed
        for call in calls:
            self._check_strict(call)
        out = [Chunk(text=before)] if before else []
        out.append(Chunk(tool_calls=tuple(calls), logprobs=self._take()))
        out.append(Chunk(finish_reason="length" if cut_off else "tool_calls", usage=last.usage))
        return out

    def _check_strict(self, call: Any) -> None:
        """A strict function's arguments are checked against its schema: its promise, as a grammar
        that left something out must not break it unnoticed."""
        schema = self.strict.get(call.name)
        if schema is None:
            return
        problem = output_problem(call.arguments, ResponseFormat(type="json_schema", schema=schema))
        if problem:
            raise StructuredOutputError(f"the call of strict function {call.name!r} does not match its "
                                        f"parameters: {problem.removeprefix('the output ')}", code="tool_call_invalid")

    def _take(self) -> tuple[TokenLogprob, ...]:
        """The log probabilities held so far (they go out with the next chunk)."""
        out, self.held = tuple(self.held), []
        return out

    async def aclose(self) -> None:
        await self.inner.aclose()
