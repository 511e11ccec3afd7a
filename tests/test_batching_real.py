"""Continuous batching on the real model: concurrency, determinism, joins, cancels, prefix reuse."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, model_server

pytestmark = pytest.mark.model
MODEL = "gemma3-270m:latest"
NO_EOS = {"1": -100, "106": -100}  # keep generating to max_tokens (eos, end_of_turn)


def request(i: int, max_tokens: int = 48) -> dict:
    return dict(model=MODEL, messages=[{"role": "user", "content": f"Write story number {i} about a fox."}],
                max_tokens=max_tokens, seed=100 + i, temperature=0.8, logit_bias=NO_EOS)


async def stream_text(client: openai.AsyncOpenAI, body: dict) -> tuple[str, float, float]:
    """Text, time of first token, time of end (perf_counter)."""
    first = 0.0
    parts = []
    stream = await client.chat.completions.create(**body, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts), first, time.perf_counter()


def test_eight_concurrent_streams_equal_solo_runs(real_server: Server) -> None:
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=real_server.v1, api_key="x", max_retries=0)
        solo = [await stream_text(client, request(i)) for i in range(8)]
        together = await asyncio.gather(*(stream_text(client, request(i)) for i in range(8)))
        for i in range(8):
            assert together[i][0] == solo[i][0], f"stream {i} differs when batched"
            assert len(solo[i][0]) > 20
        assert len({t[0] for t in together}) == 8
    asyncio.run(run())


def mixed_request(i: int) -> dict:
    """Prompts of very different lengths, shared prefixes and a continued chat."""
    rules = " ".join(f"Rule {k}: be kind to foxes, rivers and apples." for k in range(30))
    messages = [{"role": "system", "content": rules if i % 2 == 0 else "Be brief."},
                {"role": "user", "content": f"Write story number {i} about a fox." + " With twists." * (i % 4) * 3}]
    if i % 3 == 0:
        messages += [{"role": "assistant", "content": "Once upon a time there was a fox."},
                     {"role": "user", "content": "Continue."}]
    return dict(model=MODEL, messages=messages, max_tokens=24, seed=200 + i, temperature=0.8, logit_bias=NO_EOS)


def test_mixed_prompts_staggered_equal_solo_runs(real_server: Server) -> None:
    """Long and short prompts, prefix reuse, more requests than slots, arriving at odd
    times: prompts are then read in pieces of every size next to generating streams."""
    async def delayed(client: openai.AsyncOpenAI, body: dict, delay: float) -> tuple[str, float, float]:
        await asyncio.sleep(delay)
        return await stream_text(client, body)

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=real_server.v1, api_key="x", max_retries=0)
        solo = [(await stream_text(client, mixed_request(i)))[0] for i in range(11)]
        together = await asyncio.gather(*(delayed(client, mixed_request(i), (i * 7 % 11) / 10) for i in range(11)))
        differ = [i for i in range(11) if together[i][0] != solo[i]]
        assert not differ, f"streams {differ} differ when batched"
    asyncio.run(run())


def test_late_joiner_starts_before_earlier_ones_finish(real_server: Server) -> None:
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=real_server.v1, api_key="x", max_retries=0)
        early = [asyncio.ensure_future(stream_text(client, request(i, 160))) for i in range(3)]
        await asyncio.sleep(1.0)
        late = await stream_text(client, request(9, 8))
        results = await asyncio.gather(*early)
        assert late[1] < min(r[2] for r in results), "late request waited for the others"
    asyncio.run(run())


def test_cancelled_stream_frees_slot_and_others_continue(real_server: Server) -> None:
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=real_server.v1, api_key="x", max_retries=0)
        solo = await stream_text(client, request(1, 64))
        others = asyncio.ensure_future(stream_text(client, request(1, 64)))
        async with httpx.AsyncClient(timeout=60) as h:
            async with h.stream("POST", real_server.v1 + "/chat/completions",
                                json={**request(2, 2000), "stream": True}) as r:
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: ")
                    if n >= 5:
                        break  # client goes away
        result = await others
        assert result[0] == solo[0]
        # All 8 slots are usable again: 8 concurrent requests complete.
        await asyncio.gather(*(stream_text(client, request(i, 4)) for i in range(8)))
    asyncio.run(run())


def test_prefix_reuse_reports_cached_tokens(real_server: Server) -> None:
    client = openai.OpenAI(base_url=real_server.v1, api_key="x", max_retries=0)
    system = "You are a helpful assistant for a household. " * 20
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "What is tea?"}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    msgs2 = [*msgs, {"role": "assistant", "content": first.choices[0].message.content or ""},
             {"role": "user", "content": "And coffee?"}]
    second = client.chat.completions.create(model=MODEL, messages=msgs2, max_tokens=4, temperature=0)
    assert second.usage and second.usage.prompt_tokens_details
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    # Reuse is in whole prefill chunks (64 tokens by default).
    assert cached >= first.usage.prompt_tokens - 64  # type: ignore[union-attr]
    assert cached >= 128
    assert cached < second.usage.prompt_tokens


@pytest.fixture(scope="module")
def fast_server(tmp_path_factory: pytest.TempPathFactory, models_cache: Path) -> Iterator[Server]:
    """The real model with `deterministic = false` (llama.cpp's fastest kernels, no batch invariance)."""
    yield from model_server(tmp_path_factory, models_cache, "fast-home",
                            {"HEARTH_SLOTS": "2", "HEARTH_DETERMINISTIC": "false"})


def short_during_long(server: Server) -> tuple[float, float]:
    """First-token times of a ~1,500-token prompt and of a short request sent 0.3 s after it."""
    async def run() -> tuple[float, float]:
        client = openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0)
        fresh = os.urandom(4).hex()  # first in the prompt: nothing of it is in any slot's cache
        items = " ".join(f"item{k % 97}" for k in range(750))  # ~2 tokens each
        long_body = dict(model=MODEL, messages=[{"role": "user", "content": f"{fresh}: sort this list: {items}"}],
                         max_tokens=2, temperature=0, logit_bias=NO_EOS)
        short_body = dict(model=MODEL, messages=[{"role": "user", "content": f"Say hi {fresh}."}],
                          max_tokens=2, temperature=0, logit_bias=NO_EOS)
        t0 = time.perf_counter()
        long_task = asyncio.ensure_future(stream_text(client, long_body))
        await asyncio.sleep(0.3)
        short = await stream_text(client, short_body)
        long = await long_task
        return long[1] - t0, short[1] - t0
    return asyncio.run(run())


@pytest.mark.parametrize("mode", ["deterministic", "fast"])
def test_short_request_is_not_stuck_behind_a_long_prompt(mode: str, request: pytest.FixtureRequest) -> None:
    """Long prompts are read in steps: a short request that arrives meanwhile gets in after a step or two."""
    server = request.getfixturevalue("real_server" if mode == "deterministic" else "fast_server")
    long_first, short_first = short_during_long(server)
    # Read whole, the long prompt would hold the short one for most of its reading time.
    assert short_first < 0.5 * long_first, \
        f"short request's first token at {short_first:.2f}s, long prompt's at {long_first:.2f}s"
