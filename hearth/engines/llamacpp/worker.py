"""The engine worker process: one model, continuous batching on llama.cpp.

Started by the gateway as `python -m hearth.engines.llamacpp.worker` with a
socket fd. Every decode step carries one token for each generating sequence
plus prompt chunks of newly admitted ones; requests join and leave between
steps. Slots keep their tokens after a request ends so that the next request
sharing a prefix (same system prompt, a continued chat) skips recomputing it.
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hearth.engines.llamacpp.ipc import BlockingChannel, pack
from hearth.engines.llamacpp.textout import TextOut

LONE_PROMPT_STEP = 256  # prompt tokens per decode in fast mode when nothing is generating


@dataclass
class Seq:
    """One request being served in a slot."""

    rid: str
    prompt: list[int]
    spec: Any
    max_tokens: int
    stops: list[str]
    sampler: Any = None
    out: TextOut = field(default_factory=lambda: TextOut([]))
    cached: int = 0
    generated: int = 0
    last: int = -1
    logits_at: int = -1
    t_admit: int = 0
    t_first: int = 0
    logprobs: list[Any] = field(default_factory=list)  # entries of tokens whose text is not sent yet


@dataclass
class Slot:
    """A KV-cache sequence id and the tokens it currently holds."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    seq: Seq | None = None
    used_at: float = 0.0
    canonical: int = 0  # leading tokens read as prompt pieces of 2+ tokens (safe to reuse)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Worker:
    """The batching loop. All llama.cpp calls happen on this thread."""

    def __init__(self, model: Any, chan: BlockingChannel, prefill_chunk: int, deterministic: bool) -> None:
        self.m = model
        self.chan = chan
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.slots = [Slot(i) for i in range(model.n_seq)]
        self.waiting: deque[Seq] = deque()
        self.embeds: deque[list[Any]] = deque()
        self.prefill_chunk = prefill_chunk
        self.deterministic = deterministic
        self.out: list[bytes] = []
        self.running = True

    # -- messages -------------------------------------------------------------
    def emit(self, *msg: Any) -> None:
        self.out.append(pack(msg))

    def flush(self) -> None:
        if self.out:
            self.chan.sock.sendall(b"".join(self.out))
            self.out.clear()

    def reader(self) -> None:
        """Socket -> inbox (runs on its own thread)."""
        while True:
            msg = self.chan.recv()
            if msg is None:
                self.inbox.put(("quit",))
                return
            self.inbox.put(msg)

    def busy(self) -> bool:
        return bool(self.waiting or self.embeds or any(s.seq for s in self.slots))

    def drain(self, wait: bool = True) -> None:
        """Handle every message in the inbox; with `wait`, block for one when idle."""
        block = wait and not self.busy()
        if block:
            self.flush()  # replies to rejected requests must not wait for the next message
        while True:
            try:
                msg = self.inbox.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            self.handle(msg)

    def handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "gen":
            self.on_gen(*msg[1:])
        elif kind == "cancel":
            self.on_cancel(msg[1])
        elif kind == "embed":
            self.embeds.append(list(msg[1:]) + [[], 0, None])  # ... vectors, tokens, the text in progress
        elif kind == "quit":
            self.running = False

    def on_gen(self, rid: str, prompt: str, add_special: bool, spec: Any,
               max_tokens: int | None, stops: list[str], ctx: int | None = None, cap: int | None = None) -> None:
        tokens = self.m.tokenize(prompt, add_special)
        # A request may ask for a smaller context (Ollama's num_ctx), never a larger one.
        limit = min(ctx, self.m.n_ctx_seq) if ctx else self.m.n_ctx_seq
        if not tokens:
            self.emit("error", rid, "bad_request", ("the prompt is empty after tokenization; send some text", None))
            return
        outside = sorted(t for t in spec.logit_bias or () if not 0 <= t < self.m.n_vocab)
        if outside:  # llama.cpp would ignore them: say so instead
            self.emit("error", rid, "bad_request", (f"logit_bias token id {outside[0]} is not in this model's "
                                                    f"vocabulary (ids 0 to {self.m.n_vocab - 1})", "logit_bias"))
            return
        if len(tokens) >= limit or (max_tokens and len(tokens) + max_tokens > limit):
            self.emit("error", rid, "context", (len(tokens), max_tokens or 0, limit))
            return
        try:
            sampler = self.m.sampler(spec)
        except ValueError as exc:
            self.emit("error", rid, "bad_request", (str(exc), "response_format"))
            return
        budget = limit - len(tokens)
        if not max_tokens and cap:
            budget = min(budget, cap)  # setting max_tokens_limit: bounds what was left open
        seq = Seq(rid, tokens, spec, min(max_tokens or budget, budget), stops, sampler, TextOut(stops))
        self.waiting.append(seq)
        self.emit("accepted", rid, len(tokens))

    def on_cancel(self, rid: str) -> None:
        for seq in list(self.waiting):
            if seq.rid == rid:
                self.waiting.remove(seq)
                self.m.free_sampler(seq.sampler)
        for slot in self.slots:
            if slot.seq and slot.seq.rid == rid:
                self.release(slot)
        for job in list(self.embeds):
            if job[0] == rid:
                self.embeds.remove(job)

    # -- scheduling -------------------------------------------------------------
    def admit(self) -> None:
        free = [s for s in self.slots if s.seq is None]
        while self.waiting and free:
            seq = self.waiting.popleft()
            best = max(free, key=lambda s: (common_prefix(s.tokens, seq.prompt), -s.used_at))
            free.remove(best)
            keep = min(common_prefix(best.tokens, seq.prompt), len(seq.prompt) - 1)
            if self.deterministic:
                # Reuse only tokens read as prompt (generated ones were computed one
                # at a time, which gives other numbers), and leave 2+ to read.
                keep = max(0, min(keep, best.canonical, len(seq.prompt) - 2))
            if not self.m.seq_rm(best.seq_id, keep, -1):
                self.m.seq_rm(best.seq_id, -1, -1)
                keep = 0
            best.tokens = best.tokens[:keep]
            seq.cached = keep
            seq.t_admit = time.perf_counter_ns()
            best.seq = seq
            best.canonical = len(seq.prompt) if len(seq.prompt) >= 2 else 0

    def release(self, slot: Slot) -> None:
        if slot.seq is not None:
            self.m.free_sampler(slot.seq.sampler)
        slot.seq = None
        slot.used_at = time.monotonic()

    def add_generating(self, only: list[Slot] | None = None) -> list[Slot]:
        """Put the next token of every (or `only` these) generating sequence(s) into the batch."""
        generating = only if only is not None else [s for s in self.slots if s.seq and s.seq.last >= 0]
        for slot in generating:
            seq = slot.seq
            assert seq is not None
            seq.logits_at = self.m.batch_add(seq.last, len(slot.tokens), slot.seq_id, True)
            slot.tokens.append(seq.last)
        return generating

    def prefilling(self) -> list[Slot]:
        """Slots still reading their prompt, least left to read first.

        A short request that arrives while a long prompt is being read gets its
        first token after a step or two instead of waiting for the whole prompt.
        """
        slots = [s for s in self.slots if s.seq and s.seq.last < 0]
        return sorted(slots, key=lambda s: (len(s.seq.prompt) - len(s.tokens), s.seq.t_admit) if s.seq else (0, 0))

    def add_prompt(self, slot: Slot, take: int) -> int:
        """Put up to `take` more prompt tokens of `slot` into the batch."""
        seq = slot.seq
        assert seq is not None
        start = len(slot.tokens)
        take = min(take, len(seq.prompt) - start)
        for pos in range(start, start + take):
            last = pos == len(seq.prompt) - 1
            idx = self.m.batch_add(seq.prompt[pos], pos, slot.seq_id, last)
            if last:
                seq.logits_at = idx
        slot.tokens.extend(seq.prompt[start:start + take])
        return take

    def decode(self) -> bool:
        """Decode the batch and sample every sequence that got logits in it."""
        if self.m.batch.n_tokens == 0:
            return True
        rc = self.m.decode()
        if rc != 0:
            self.fail_active(f"llama_decode failed (code {rc})")
            return False
        ready = [(slot, slot.seq) for slot in self.slots if slot.seq is not None and slot.seq.logits_at >= 0]
        tokens = self.m.sample_all([(seq.sampler, seq.logits_at) for _, seq in ready])
        for (slot, seq), token in zip(ready, tokens):
            if seq.spec.logprobs >= 0 and not self.m.is_eog(token):
                seq.logprobs.append(self.logprob_entry(seq, token))
            self.take(slot, seq, token)
        return True

    def logprob_entry(self, seq: Seq, token: int) -> tuple[bytes, float, list[tuple[bytes, float]]]:
        """(token bytes, log probability, [(alternative bytes, log probability)...]) for the IPC message."""
        lp, top = self.m.logprobs(seq.logits_at, token, seq.spec.logprobs)
        return self.m.piece(token), lp, [(self.m.piece(t), v) for t, v in top]

    def step_fast(self) -> None:
        """One llama_decode: a token per generating sequence plus prompt chunks."""
        m = self.m
        m.batch_clear()
        generating = self.add_generating()
        # With nothing generating a prompt still goes in steps of LONE_PROMPT_STEP
        # tokens: a request arriving meanwhile waits one such step, not the whole
        # prompt (seconds for a long one); steps this size cost no throughput.
        budget = min(m.batch_cap - len(generating), self.prefill_chunk if generating
                     else max(self.prefill_chunk, LONE_PROMPT_STEP))
        for slot in self.prefilling():
            budget -= self.add_prompt(slot, budget)
            if budget <= 0:
                break
        self.decode()

    def step_deterministic(self) -> None:
        """Prompt pieces in one decode, then generating tokens in another.

        llama.cpp's numbers for a token can depend on what it is batched with.
        With weight repacking and ggml's tiled K-quant matmul off (native.Model),
        they depend only on the shape each sequence has inside a micro-batch:
        flash attention reads 64+ rows of one sequence with a tiled kernel, and a
        single row that is alone in its micro-batch at 512+ KV cells is split
        over threads. So prompts are read in pieces of 2 to PIECE_MAX tokens,
        generating tokens go one per sequence, and a sequence that would be alone
        in its micro-batch gets a throwaway token on a neighbouring sequence. A
        seeded request then gives the same output alone or in a full batch.
        Prompts go first so that a request whose prompt is done gets its first
        token out at once and joins this step's generating decode.
        """
        m = self.m
        busy = any(s.seq and s.seq.last >= 0 for s in self.slots)
        budget = min(m.batch_cap, self.prefill_chunk) if busy else m.batch_cap  # batch_size < prefill_chunk
        if not self.read_prompts(budget):
            return
        # Requests that came in meanwhile are read now, before the generating
        # decode, instead of a whole step later (first token sooner).
        known = {id(s.seq) for s in self.slots if s.seq}
        self.drain(wait=False)
        if not self.running:
            return
        self.admit()
        fresh = [s for s in self.slots if s.seq and id(s.seq) not in known]
        if fresh and not self.read_prompts(budget, fresh):
            return
        generating = [s for s in self.slots if s.seq and s.seq.last >= 0]
        if not generating:
            return
        m.batch_clear()
        neighbours = self.neighbours(generating)
        # llama.cpp makes one micro-batch of each run of consecutive sequence ids
        # in batch order, so the batch goes in sequence-id order.
        for seq_id in sorted({s.seq_id for s in generating} | set(neighbours)):
            if seq_id in neighbours:
                m.batch_add(0, neighbours[seq_id], seq_id, False)
            else:
                self.add_generating([self.slots[seq_id]])
        self.decode()
        for seq_id, pos in neighbours.items():
            m.seq_rm(seq_id, pos, -1)

    def neighbours(self, generating: list[Slot]) -> dict[int, int]:
        """Sequence id -> position of a throwaway token beside each lone generating sequence.

        Only needed once its KV reaches 256 cells (llama.cpp pads to 256 and
        splits a lone row at 512). The token goes after the neighbour's cached
        tokens and is removed after the decode.
        """
        m = self.m
        ids = {s.seq_id for s in generating}
        out: dict[int, int] = {}
        for slot in generating:
            s = slot.seq_id
            if s - 1 in ids or s + 1 in ids or s - 1 in out or s + 1 in out or len(slot.tokens) + 1 <= 256:
                continue
            n = s + 1 if s + 1 < m.n_streams else s - 1
            held = len(self.slots[n].tokens) if 0 <= n < len(self.slots) else 0
            if n < 0 or held >= m.n_ctx_seq:
                continue  # no room beside it: this step may differ in the last bits
            m.seq_rm(n, held, -1)
            out[n] = held
        return out

    def read_prompts(self, budget: int, among: list[Slot] | None = None) -> bool:
        """One decode of prompt pieces (see prompt_pieces); False if it failed."""
        pieces = self.prompt_pieces(budget, among)
        if not pieces:
            return True
        self.m.batch_clear()
        for slot, size in pieces:
            self.add_prompt(slot, size)
        if not self.decode():
            return False
        self.flush()
        return True

    def prompt_pieces(self, budget: int, among: list[Slot] | None = None) -> list[tuple[Slot, int]]:
        """Equal-size prompt pieces for one decode, in seq-id order.

        llama.cpp splits a multi-sequence batch into micro-batches with the same
        number of tokens per sequence (runs of consecutive seq ids): equal
        pieces keep each piece whole, so none is cut down to a single token.
        """
        order = [s for s in self.prefilling() if among is None or s in among]
        if not order:
            return []

        def left(slot: Slot) -> int:
            assert slot.seq is not None
            return len(slot.seq.prompt) - len(slot.tokens)

        first = left(order[0])
        size = min(first, budget, self.m.piece_max)
        if first - size == 1:  # never leave a single token to read
            size -= 1
        size = max(size, min(first, 2))
        chosen = [order[0]]
        for slot in order[1:]:
            if (len(chosen) + 1) * size > budget:
                break
            rest = left(slot) - size
            if rest == 0 or rest >= 2:
                chosen.append(slot)
        return [(slot, size) for slot in sorted(chosen, key=lambda s: s.seq_id)]

    def step(self) -> None:
        if self.deterministic:
            self.step_deterministic()
        else:
            self.step_fast()
        if self.embeds:
            self.embed_step()

    def take(self, slot: Slot, seq: Seq, token: int) -> None:
        """Act on a sampled token: emit its text, or finish the sequence."""
        m = self.m
        now = time.perf_counter_ns()
        if seq.last < 0:
            seq.t_first = now
        seq.logits_at = -1
        if m.is_eog(token):
            return self.finish(slot, seq, "stop")
        seq.generated += 1
        seq.last = token
        text = seq.out.push(m.piece(token))
        if text:
            self.emit_text(seq, text)
        if seq.out.stopped:
            return self.finish(slot, seq, "stop")
        if seq.generated >= seq.max_tokens or len(slot.tokens) + 1 >= m.n_ctx_seq:
            return self.finish(slot, seq, "length")

    def emit_text(self, seq: Seq, text: str) -> None:
        """Send text, with the log probabilities of the tokens it holds when they were asked for."""
        if seq.spec.logprobs >= 0:
            self.emit("text", seq.rid, text, seq.logprobs)
            seq.logprobs = []
        else:
            self.emit("text", seq.rid, text)

    def finish(self, slot: Slot, seq: Seq, reason: str) -> None:
        tail = seq.out.flush()
        if tail:
            self.emit_text(seq, tail)
        end = time.perf_counter_ns()
        first = seq.t_first or end
        usage = {
            "prompt_tokens": len(seq.prompt),
            "completion_tokens": seq.generated,
            "cached_tokens": seq.cached,
            "prompt_ns": first - seq.t_admit,
            "generate_ns": end - first,
        }
        self.emit("done", seq.rid, reason, usage)
        self.release(slot)

    def fail_active(self, message: str) -> None:
        for slot in self.slots:
            if slot.seq is not None:
                self.emit("error", slot.seq.rid, "engine", message)
                self.m.seq_rm(slot.seq_id, -1, -1)
                slot.tokens = []
                self.release(slot)

    def embed_step(self) -> None:
        """One decode of the oldest embedding job's current text: a long text goes in pieces, with
        generation steps between them (it used to hold every stream for its whole length)."""
        job = self.embeds[0]
        rid, texts, truncate, vectors, total, steps = job
        if steps is None:
            steps = job[5] = self.m.embed_steps(texts[len(vectors)], truncate)
        try:
            next(steps)
            return
        except StopIteration as done:
            vec, n = done.value
            job[5] = None
        except OverflowError as exc:
            self.embeds.popleft()
            self.emit("error", rid, "embed_context", (int(exc.args[0]), len(vectors), self.m.n_ctx_seq))
            return
        vectors.append(vec)
        job[4] = total + n
        if len(vectors) == len(texts):
            self.embeds.popleft()
            self.emit("embedding", rid, vectors, job[4])

    def run(self) -> None:
        threading.Thread(target=self.reader, daemon=True).start()
        while self.running:
            self.drain()
            if not self.running:
                break
            self.admit()
            self.step()
            self.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hearth llama.cpp worker (started by the gateway)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--fast", action="store_true", help="allow batch-dependent kernels (repacking)")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    chan = BlockingChannel(sock)
    from hearth.engines.llamacpp import native

    native.silence_logs()
    try:
        model = native.Model(args.model, args.slots, args.ctx, args.batch, args.threads,
                             deterministic=not args.fast)
    except Exception as exc:  # reported to the gateway, then exit
        chan.send(("fatal", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    chan.send(("ready", model.describe()))
    Worker(model, chan, args.prefill_chunk, deterministic=not args.fast).run()


if __name__ == "__main__":
    main()
