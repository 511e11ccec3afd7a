"""One upstream stream, read as the core's chunks: timeouts, clean errors, usage and the cloud audit.

Once text has reached the caller nothing is retried: a stream that breaks
ends in an error naming the upstream, and the replica is reported failed.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from hearth.core.errors import HearthError, UpstreamError
from hearth.core.structured import output_problem
from hearth.core.types import Chunk, GenerateRequest
from hearth.engines.upstream.http import RETRYABLE, Response
from hearth.engines.upstream.replicas import Replica, describe
from hearth.engines.upstream.watchdog import Watchdog

if TYPE_CHECKING:
    from hearth.engines.upstream.engine import UpstreamEngine

log = logging.getLogger("hearth.upstream")
MAX_EVENT = 8 << 20  # bytes of one streamed line (token events are tiny; Ollama's last may hold a context)


class UpstreamGeneration:
    """Chunks of one upstream stream; closing early drops the connection (the upstream stops).

    An async iterator class rather than an async generator: asyncio registers
    every async generator in a weak set when it starts (two Python calls and a
    weak reference), and this runs once per proxied request.
    """

    prompt_tokens = 0  # known only at the end; the final chunk's usage carries it

    def __init__(self, engine: UpstreamEngine, replica: Replica, resp: Response,
                 req: GenerateRequest, model: str, dog: Watchdog) -> None:
        self.engine = engine
        self.dog = dog
        self.replica = replica
        self.resp = resp
        self.req = req
        self.model = model
        self.parser = engine.wire.parser(req.messages is not None)
        self._open = True
        self._t0 = time.perf_counter_ns()
        self._texts: list[str] = []
        self._rest = b""  # the start of a line not complete yet
        self._started = False  # something arrived: the idle timeout applies from now on
        self._deadline = dog.now() + engine.cfg.timeouts.first_token
        self._ended = False  # the stream is complete: the final chunk is next
        self._finished = False  # the final chunk went out
        self._audited = False  # the cloud audit line is written (once, however the stream ends)

    def __aiter__(self) -> UpstreamGeneration:
        return self

    async def __anext__(self) -> Chunk:
        if self._finished:
            raise StopAsyncIteration
        try:
            text = None if self._ended else await self._next_text()
            if text is not None:
                self._texts.append(text)
                # the read that carried this text also ended the stream (an instant upstream): one chunk
                # for both, unless a strict format check could still fail (the text goes out first then)
                if not self._ended or self.req.response_format.type != "text":
                    parser = self.parser
                    return Chunk(text=text, logprobs=parser.take_logprobs(self.req.logprobs),
                                 thinking=parser.take_thinking())
            self._finished = True
            return self._final(text or "")
        except HearthError:
            self._audit(0, self.parser.pieces, "error")
            self._finished = True
            await self.aclose()
            raise
        except BaseException:
            self._finished = True
            await self.aclose()
            raise

    def _final(self, text: str = "") -> Chunk:
        """The last chunk: finish reason, usage, tool calls (after the format check), and `text` if the
        last read brought some."""
        eng, parser = self.engine, self.parser
        eng.pool.succeeded(self.replica)
        calls = parser.tool_calls()
        finish = parser.finish or "stop"
        if calls and finish == "stop":  # Ollama says "stop" after tool calls; OpenAI clients look for this
            finish = "tool_calls"
        refusal = "".join(parser.refusal)
        if not calls and not refusal:  # a refusal is no output to check against the schema
            self._check_format("".join(self._texts), finish)
        usage = parser.final_usage()
        usage.total_ns = usage.total_ns or time.perf_counter_ns() - self._t0
        if self.req.logprobs is not None and self._texts and not parser.logprobs_seen:
            log.warning("upstream %r sent no logprobs for %s (it may not support them)", eng.name, self.model)
        self._audit(usage.prompt_tokens, usage.completion_tokens, "ok")
        chunk = Chunk(text=text, finish_reason=finish, usage=usage, tool_calls=tuple(calls),  # type: ignore[arg-type]
                      logprobs=parser.take_logprobs(self.req.logprobs), thinking=parser.take_thinking(),
                      refusal=refusal)
        self._release()
        return chunk

    async def _next_text(self) -> str | None:
        """The text of the next read that carries any (None at the end), with the first-token and idle
        timeouts and clean errors. Reads whatever bytes have arrived (one timeout per read, not per line:
        an instant upstream's whole answer is usually one read), so pieces that arrived together go out
        together: one chunk per read, not per upstream event (fewer writes; same text)."""
        eng, parser, resp, dog = self.engine, self.parser, self.resp, self.dog
        t = eng.cfg.timeouts
        while True:
            try:  # what is here already needs no wait (an instant upstream's whole answer came with its head)
                data = resp.ready() or \
                    await dog.within(dog.now() + t.idle if self._started else self._deadline, resp.readany())
            except TimeoutError:
                what = f"sent nothing for {t.idle:g}s (timeouts.idle)" if self._started else \
                    f"sent no token within {t.first_token:g}s (timeouts.first_token)"
                raise self._broken(what, status=504) from None
            except RETRYABLE as exc:
                raise self._broken(f"broke the connection: {describe(exc)}") from None
            if not data:
                if self._rest:
                    data = b"\n"  # a last line without a newline
                elif parser.done or parser.finish:
                    self._ended = True
                    return None
                else:
                    raise self._broken("closed the stream before finishing")
            lines = (self._rest + data).split(b"\n")
            self._rest = lines.pop()
            if len(self._rest) > MAX_EVENT:  # a broken upstream: bound the memory and the re-joining
                raise self._broken(f"sent a line longer than {MAX_EVENT >> 20} MB without an end")
            try:
                text = parser.feed(lines)
            except UpstreamError as exc:
                raise UpstreamError(f"upstream {eng.name!r} {exc.message}") from None
            self._ended = parser.done
            self._started = self._started or bool(text) or parser.calls_seen or bool(parser.thinking)
            if text or parser.thinking:
                return text
            if self._ended:
                return None

    def _broken(self, what: str, status: int = 502) -> UpstreamError:
        """The clean error a caller gets when a started stream fails (never retried)."""
        if status == 502:
            self.engine.pool.failed(self.replica, what)
        partial = "; the answer is incomplete, retry the request" if self.parser.pieces else ""
        return UpstreamError(f"upstream {self.engine.name!r} ({self.replica.url}) {what}{partial}", status=status)

    def _check_format(self, text: str, finish: str) -> None:
        """Strict structured output on upstreams: an invalid result is a 502 naming the error."""
        fmt = self.req.response_format
        if fmt.type == "text" or finish == "length" or not (fmt.strict or self.engine.cfg.strict):
            return
        problem = output_problem(text, fmt)
        if problem:
            raise UpstreamError(
                f"upstream {self.engine.name!r} returned structured output that fails validation: {problem} "
                "(strict mode; send strict: false to accept such output)",
                code="upstream_invalid_output",
            )

    def _release(self) -> None:
        """Give the connection back (or cut an unfinished stream so the upstream stops generating)."""
        if not self._open:
            return
        self._open = False
        self.dog.close()
        if self.parser.done or self.parser.finish:
            self.resp.release_after_end()
        else:
            self.resp.close()
        self.engine.pool.release(self.replica)
        if self.engine.managed is not None:
            self.engine.managed.release()

    def _audit(self, prompt_tokens: int, completion_tokens: int, outcome: str) -> None:
        if not self._audited:
            self._audited = True
            self.engine._audit(self.model, prompt_tokens, completion_tokens, outcome)

    async def aclose(self) -> None:
        """Stop reading; an unfinished stream is cut so the upstream stops generating. A stream left
        before its end (the client went away) is audited too: its prompt was sent all the same."""
        self._finished = True
        self._audit(0, self.parser.pieces, "cancelled")
        self._release()
