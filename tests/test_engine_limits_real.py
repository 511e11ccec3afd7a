"""The in-box engine at the edges of its settings, on the real model: a batch smaller than the prompt
step, the max_tokens_limit cap, and unloads that must stay unloaded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.conftest import Server, model_server

pytestmark = pytest.mark.model
MODEL = "gemma3-270m:latest"
NO_EOS = {"1": -100, "106": -100}
LONG = " ".join(f"Line {k}: the fox crossed the river at dawn." for k in range(24))  # ~280 tokens


@pytest.fixture(scope="module")
def edge_server(tmp_path_factory: pytest.TempPathFactory, models_cache: Path) -> Iterator[Server]:
    """batch_size 64 under the default prefill_chunk 128; a 512-token context; a cap of 400 tokens."""
    yield from model_server(tmp_path_factory, models_cache, "edge-home", {
        "HEARTH_SLOTS": "3", "HEARTH_BATCH_SIZE": "64", "HEARTH_CTX_PER_SLOT": "512",
        "HEARTH_MAX_TOKENS_LIMIT": "400"})


def loaded(server: Server) -> list[str]:
    return [m["name"] for m in httpx.get(server.url + "/api/ps").json()["models"]]


def test_long_prompts_beside_a_generating_stream_fit_a_small_batch(edge_server: Server) -> None:
    """With batch_size below prefill_chunk the prompt pieces overflowed the batch and killed the worker."""
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=edge_server.v1, api_key="x", max_retries=0, timeout=120)

        async def ask(text: str, n: int) -> str:
            resp = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=n, logit_bias=NO_EOS)
            return resp.choices[0].message.content or ""

        first = asyncio.ensure_future(ask("Tell a story about a fox.", 60))
        await asyncio.sleep(0.5)  # generating now
        return await asyncio.gather(first, ask(LONG + " Summarise.", 8), ask(LONG + " Continue.", 8))

    answers = asyncio.run(run())
    assert all(answers)
    restarts = [line for line in httpx.get(edge_server.url + "/metrics").text.splitlines()
                if line.startswith("hearth_engine_restarts_total")]
    assert restarts and all(line.endswith(" 0.0") for line in restarts), restarts


def test_the_cap_bounds_a_request_without_max_tokens_instead_of_refusing_it(edge_server: Server) -> None:
    client = openai.OpenAI(base_url=edge_server.v1, api_key="x", max_retries=0, timeout=120)
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG}],
                                          logit_bias=NO_EOS)  # 280 + 400 > 512: was a 400
    assert resp.usage.prompt_tokens + resp.usage.completion_tokens <= 512
    assert resp.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="over this server's limit of 400"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=401)
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens 401 is over") as exc:  # what it sent
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=401)
    assert exc.value.body["param"] == "max_completion_tokens"  # type: ignore[index]


def test_an_unload_during_a_request_is_kept_and_ready_does_not_reload(edge_server: Server) -> None:
    client = ollama.Client(host=edge_server.url, timeout=120)
    client.generate(model=MODEL, prompt="", keep_alive="5m")
    assert loaded(edge_server) == [MODEL]

    async def run() -> None:
        aclient = ollama.AsyncClient(host=edge_server.url, timeout=120)
        running = asyncio.ensure_future(aclient.generate(
            model=MODEL, prompt="Count to fifty:", options={"num_predict": 80, "temperature": 0}))
        await asyncio.sleep(0.5)
        unloaded = await aclient.generate(model=MODEL, prompt="", keep_alive=0)  # `ollama stop`
        assert unloaded.done_reason == "unload"
        await running  # its end used to set a fresh 5-minute keep-alive

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while loaded(edge_server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert loaded(edge_server) == []
    assert httpx.get(edge_server.url + "/ready").status_code == 200
    time.sleep(0.5)
    assert loaded(edge_server) == []  # a readiness probe does not load the model again


def _worker_rss_mb(server: Server) -> int:
    """Resident memory of the server's engine worker (its child process)."""
    children = [int(p) for p in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()]
    assert children, "no engine worker"
    status = Path(f"/proc/{children[0]}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) // 1024


def test_a_long_embedding_input_does_not_keep_gigabytes(real_server: Server) -> None:
    """llama.cpp keeps a row of logits (1 MB with this vocabulary) per token of an embedding batch."""
    client = ollama.Client(host=real_server.url, timeout=300)
    client.embed(model=MODEL, input="warm up")
    before = _worker_rss_mb(real_server)
    long = client.embed(model=MODEL, input="word " * 2000)  # 2000 tokens in one batch held 2 GB for good
    short = client.embed(model=MODEL, input="word " * 3)
    assert len(long.embeddings[0]) == len(short.embeddings[0]) == 640
    grew = _worker_rss_mb(real_server) - before
    assert grew < 700, f"the worker grew by {grew} MB"


def test_a_long_embedding_does_not_hold_up_a_chat(real_server: Server) -> None:
    """A long text is embedded in pieces with generation steps between them."""
    async def run() -> tuple[float, float]:
        aclient = ollama.AsyncClient(host=real_server.url, timeout=300)
        t0 = time.perf_counter()

        async def embed() -> float:
            await aclient.embed(model=MODEL, input="word " * 2000)
            return time.perf_counter() - t0

        async def chat() -> float:
            await asyncio.sleep(1.0)  # the embedding is under way
            await aclient.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                               options={"num_predict": 4})
            return time.perf_counter() - t0

        embedded, chatted = await asyncio.gather(embed(), chat())
        return embedded, chatted

    embedded, chatted = asyncio.run(run())
    assert chatted < 0.5 * embedded, f"chat done at {chatted:.1f}s, the embedding at {embedded:.1f}s"


def test_ollama_num_predict_is_a_ceiling_not_room_to_reserve(edge_server: Server) -> None:
    """280 prompt tokens + num_predict 300 > 512: Ollama generates to the end of the context; it was a 400."""
    client = ollama.Client(host=edge_server.url, timeout=120)
    out = client.generate(model=MODEL, prompt=LONG + " Line 24:", raw=True, options={"num_predict": 300})
    assert out.prompt_eval_count + out.eval_count <= 512
    assert out.done_reason in ("length", "stop")
    # over the server's max_tokens_limit (400): bounded by it, as a ceiling is
    out = client.generate(model=MODEL, prompt="Count: 1 2 3", raw=True,
                          options={"num_predict": 450, "temperature": 0})
    assert out.eval_count <= 400
