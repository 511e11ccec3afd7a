"""Thin, typed wrappers over llama-cpp-python's low-level (ctypes) API.

Only the worker process imports this module: a crash in native code must
never take the gateway down.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Generator
from typing import Any

import llama_cpp as L

from hearth.engines.llamacpp.native_spec import SamplerSpec

EMBED_STEP = 128  # tokens per embedding decode: bounds the logits llama.cpp keeps (a row per token)


def silence_logs() -> None:
    """Keep llama.cpp's chatter (it logs every tensor) out of hearth's log."""

    @L.llama_log_callback
    def _quiet(level: int, text: bytes, user_data: Any) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR: worth seeing in hearth's log
            sys.stderr.write(text.decode("utf-8", "replace"))

    # Keep a reference so the callback is not garbage-collected.
    silence_logs.callback = _quiet  # type: ignore[attr-defined]
    L.llama_log_set(_quiet, ctypes.c_void_p(0))


PIECE_MAX = 63  # longest prompt piece in deterministic mode: below ggml's 64-row FA tile


class Model:
    """A loaded GGUF model with a generation context and an embedding context."""

    def __init__(self, path: str, n_seq: int, n_ctx_seq: int, n_batch: int, threads: int,
                 deterministic: bool = True) -> None:
        if deterministic:
            # ggml's CPU backend switches K-quant matmuls to a tiled kernel at 8+
            # rows, so a token's logits would change once 8 sequences share a
            # decode. Read once per process, at the first matmul: set it first.
            os.environ["GGML_CPU_TILED_MM"] = "0"
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        # Repacked weights use different kernels for 1 row and for 4+ rows, so a
        # sequence's logits would depend on what else is in the batch.
        mparams.use_extra_bufts = not deterministic
        self.model = L.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = L.llama_model_n_ctx_train(self.model)
        self.n_embd = L.llama_model_n_embd(self.model)
        self.n_seq = n_seq
        self.n_ctx_seq = min(n_ctx_seq, self.n_ctx_train) if self.n_ctx_train > 0 else n_ctx_seq
        self.n_batch = n_batch
        # A one-slot engine gets a spare KV stream: the worker's lone-sequence
        # neighbour in deterministic mode (see Worker.add_neighbours).
        self.n_streams = n_seq + 1 if deterministic and n_seq == 1 else n_seq
        cparams = L.llama_context_default_params()
        cparams.n_ctx = self.n_ctx_seq * self.n_streams
        cparams.n_batch = max(n_batch, self.n_streams)
        cparams.n_ubatch = max(n_batch, self.n_streams)
        cparams.n_seq_max = self.n_streams
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False  # one KV stream per sequence: its cells stay in position order
        if deterministic:
            # Flash attention computes each query row on its own over the KV cells
            # in order (masked ones skipped), except for 64+ rows of one sequence
            # (tiled kernel) and a single row alone at 512+ cells (split over
            # threads): the worker avoids both (prompt pieces of at most
            # PIECE_MAX tokens, a neighbour for lone sequences).
            cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.swa_full = True  # keep whole sliding-window KV so prefixes can be reused
        cparams.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx and deterministic:  # no flash attention for this model: the plain path is
            cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED  # batch-invariant too
            self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(cparams.n_batch, 0, 1)
        self.batch_cap = cparams.n_batch
        self.piece_max = PIECE_MAX
        self.threads = threads
        self._ectx: Any = None
        self._estep = EMBED_STEP  # tokens per embedding decode (the whole text for an encoder)
        self._piece = ctypes.create_string_buffer(256)
        self._pool: ThreadPoolExecutor | None = None

    # -- metadata -------------------------------------------------------
    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None."""
        buf = ctypes.create_string_buffer(65536)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def chat_template(self) -> str | None:
        raw = L.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def describe(self) -> dict[str, Any]:
        """Facts the gateway needs (sent once in the `ready` message)."""
        desc = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, desc, len(desc))
        bos = L.llama_vocab_bos(self.vocab)
        eos = L.llama_vocab_eos(self.vocab)
        return {
            "n_ctx_train": self.n_ctx_train,
            "n_ctx_seq": self.n_ctx_seq,
            "n_seq": self.n_seq,
            "n_embd": self.n_embd,
            "n_vocab": self.n_vocab,
            "size": L.llama_model_size(self.model),
            "n_params": L.llama_model_n_params(self.model),
            "desc": desc.value.decode("utf-8", "replace"),
            "architecture": self.meta("general.architecture") or "",
            "chat_template": self.chat_template(),
            "bos": self.piece(bos, special=True).decode("utf-8", "replace") if bos >= 0 else "",
            "eos": self.piece(eos, special=True).decode("utf-8", "replace") if eos >= 0 else "",
        }

    # -- text <-> tokens --------------------------------------------------
    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, True)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, True)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        n = L.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, big, len(big), 0, special)
            return big.raw[:n]
        return self._piece.raw[:n]

    def logprobs(self, index: int, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        """Log probability of `token` under the model's raw distribution at batch
        index `index` (before sampling settings), and the `top` likeliest tokens."""
        import numpy as np

        ptr = L.llama_get_logits_ith(self.ctx, index)
        # float32 over the vocabulary (a view of llama.cpp's buffer, not a copy), the sum in float64:
        # ~0.8 ms per token for 262k entries here, against ~5 ms in float64 throughout.
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        peak = float(logits.max())
        lse = peak + math.log(float(np.exp(logits - peak).sum(dtype=np.float64)))
        best: list[tuple[int, float]] = []
        if top > 0:
            ids = np.argpartition(logits, -top)[-top:]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            best = [(int(i), float(logits[i]) - lse) for i in ids]
        return float(logits[token]) - lse, best

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    # -- sampling -----------------------------------------------------------
    def sampler(self, spec: SamplerSpec) -> Any:
        """A fresh sampler chain for one request (ValueError for a grammar llama.cpp cannot parse)."""
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        add = lambda s: L.llama_sampler_chain_add(chain, s)  # noqa: E731
        if spec.grammar:
            grammar = self._grammar(spec.grammar, spec.grammar_triggers)
            if not grammar:
                L.llama_sampler_free(chain)
                raise ValueError("the grammar for this response_format could not be parsed")
            add(grammar)
        if spec.logit_bias:
            arr = (L.llama_logit_bias * len(spec.logit_bias))()
            for i, (tok, bias) in enumerate(spec.logit_bias.items()):
                arr[i].token = tok  # type: ignore[assignment]  # ctypes converts the int
                arr[i].bias = -1e30 if bias <= -100 else bias
            add(L.llama_sampler_init_logit_bias(self.n_vocab, len(spec.logit_bias), arr))
        if spec.repeat_penalty != 1.0 or spec.presence_penalty or spec.frequency_penalty:
            add(L.llama_sampler_init_penalties(
                self.n_vocab, spec.repeat_last_n, spec.repeat_penalty,
                spec.frequency_penalty, spec.presence_penalty))
        if spec.temperature <= 0:
            add(L.llama_sampler_init_greedy())
            return chain
        if spec.top_k > 0:
            add(L.llama_sampler_init_top_k(spec.top_k))
        if spec.top_p < 1.0:
            add(L.llama_sampler_init_top_p(spec.top_p, 1))
        if spec.min_p > 0:
            add(L.llama_sampler_init_min_p(spec.min_p, 1))
        add(L.llama_sampler_init_temp(spec.temperature))
        seed = spec.seed if spec.seed is not None else L.LLAMA_DEFAULT_SEED
        add(L.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _grammar(self, text: str, triggers: list[str] | None) -> Any:
        """A grammar sampler; with triggers a lazy one: free text until a trigger regex
        matches, then the grammar from the first capture group on."""
        if not triggers:
            return L.llama_sampler_init_grammar(self.vocab, text.encode(), b"root")
        patterns = (ctypes.c_char_p * len(triggers))(*(t.encode() for t in triggers))
        return L.llama_sampler_init_grammar_lazy_patterns(
            self.vocab, text.encode(), b"root", patterns, len(triggers), None, 0)

    def sample(self, chain: Any, index: int) -> int:
        return int(L.llama_sampler_sample(chain, self.ctx, index))

    def sample_all(self, jobs: list[tuple[Any, int]]) -> list[int]:
        """Sample several sequences (chain, batch index); half of them on a helper thread.

        Sampling walks the whole vocabulary (262k tokens for Gemma 3) on one
        core while the other idles between decodes; ctypes lets go of the GIL
        during each call, so two threads halve that time. Each chain is used by
        one thread only, so results do not depend on the split.
        """
        if len(jobs) < 2 or self.threads < 2:
            return [self.sample(c, i) for c, i in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hearth-sample")
        # The first logits read syncs the context and reorders outputs: do it here, once.
        L.llama_get_logits_ith(self.ctx, jobs[0][1])
        half = len(jobs) // 2
        rest = self._pool.submit(lambda: [self.sample(c, i) for c, i in jobs[half:]])
        first = [self.sample(c, i) for c, i in jobs[:half]]
        return first + rest.result()

    @staticmethod
    def free_sampler(chain: Any) -> None:
        L.llama_sampler_free(chain)

    # -- batches and KV ---------------------------------------------------------
    def batch_clear(self) -> None:
        self.batch.n_tokens = 0

    def batch_add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append a token; returns its index in the batch."""
        b = self.batch
        i = b.n_tokens
        if i >= self.batch_cap:
            raise OverflowError("batch is full")
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    def decode(self) -> int:
        return int(L.llama_decode(self.ctx, self.batch))

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        return bool(L.llama_memory_seq_rm(self.mem, seq, p0, p1))

    # -- embeddings -----------------------------------------------------------
    def _embedding_context(self, step: int) -> Any:
        cparams = L.llama_context_default_params()
        cparams.n_ctx = self.n_ctx_seq
        cparams.n_batch = step
        cparams.n_ubatch = step
        cparams.n_seq_max = 1
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.embeddings = True
        cparams.pooling_type = L.LLAMA_POOLING_TYPE_NONE
        cparams.no_perf = True
        return L.llama_init_from_model(self.model, cparams)

    def embed_steps(self, text: str, truncate: bool) -> Generator[None, None, tuple[list[float], int]]:
        """The embedding of one text, one decode per step (the worker runs generation in between);
        returns the mean-pooled, L2-normalised vector and the token count. Raises OverflowError
        (at the first step) for a text over the context without `truncate`.

        llama.cpp makes every token of an embedding batch an output, with a full
        row of logits each: a 4096-token text in one batch held 4 GB for the
        worker's life. So the text goes through in steps of EMBED_STEP tokens
        (one sequence, its KV cache carried on), each token's hidden state is
        taken unpooled and the mean is made here: the same vector as llama.cpp's
        MEAN pooling over one batch, in bounded memory.
        """
        import numpy as np

        if self._ectx is None:
            self._ectx, self._estep = self._embedding_context(EMBED_STEP), EMBED_STEP
            if not L.llama_get_memory(self._ectx):
                # no KV cache (an encoder such as nomic-bert): steps would not see each other, so the
                # whole text goes in one (encoders compute no logits, so it stays small)
                L.llama_free(self._ectx)
                self._ectx, self._estep = self._embedding_context(self.n_ctx_seq), self.n_ctx_seq
            self._ebatch = L.llama_batch_init(self._estep, 0, 1)
        tokens = self.tokenize(text, add_special=True)
        if len(tokens) > self.n_ctx_seq:
            if not truncate:
                raise OverflowError(len(tokens))
            tokens = tokens[: self.n_ctx_seq]
        memory = L.llama_get_memory(self._ectx)
        if memory:
            L.llama_memory_clear(memory, True)
        b = self._ebatch
        total = np.zeros(self.n_embd, dtype=np.float64)
        for start in range(0, len(tokens), self._estep):
            step = tokens[start:start + self._estep]
            for i, tok in enumerate(step):
                b.token[i] = tok
                b.pos[i] = start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = True
            b.n_tokens = len(step)
            if L.llama_decode(self._ectx, b) != 0:
                raise RuntimeError("llama_decode failed while embedding")
            rows = np.ctypeslib.as_array(L.llama_get_embeddings(self._ectx), shape=(len(step) * self.n_embd,))
            total += rows.reshape(len(step), self.n_embd).sum(axis=0, dtype=np.float64)
            if start + self._estep < len(tokens):
                yield  # more to come: generation gets a step first
        vec = total / len(tokens)
        norm = float(np.sqrt(np.dot(vec, vec))) or 1.0
        return [float(x) / norm for x in vec], len(tokens)
