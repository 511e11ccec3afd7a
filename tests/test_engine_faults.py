"""The in-box engine's fault contract on the real model: crash, queue full, disconnect."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, model_server

pytestmark = pytest.mark.model
MODEL = "gemma3-270m:latest"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_cache: Path) -> Iterator[Server]:
    yield from model_server(tmp_path_factory, models_cache, "faults-home",
                            {"HEARTH_SLOTS": "2", "HEARTH_MAX_QUEUE": "1"})


def worker_pids(server: Server) -> list[int]:
    pids = []
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"hearth.engines.llamacpp.worker" in cmd:
                pids.append(int(child))
    return pids


def long_stream(server: Server, max_tokens: int = 400, seed: int = 1) -> httpx.Response:
    return httpx.stream("POST", server.v1 + "/completions", timeout=120, json={
        "model": MODEL, "prompt": "A long story about a dragon:", "max_tokens": max_tokens,
        "stream": True, "seed": seed, "logit_bias": {"1": -100, "106": -100},
    })


def test_worker_killed_mid_stream_gives_clean_error_and_recovers(server: Server) -> None:
    [pid] = worker_pids(server)
    events: list[dict] = []
    with long_stream(server) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            events.append(event)
            if len(events) == 5:
                os.kill(pid, signal.SIGKILL)
    assert "error" in events[-1], events[-3:]
    assert events[-1]["error"]["code"] == "engine_unavailable"
    assert "retry" in events[-1]["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200
    # A new worker is started without waiting for a request.
    deadline = time.time() + 30
    while time.time() < deadline and not [p for p in worker_pids(server) if p != pid]:
        time.sleep(0.2)
    assert [p for p in worker_pids(server) if p != pid], "worker was not restarted"
    metrics = httpx.get(server.url + "/metrics").text
    assert "restart" in metrics
    # The next request succeeds on the new worker.
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    resp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert resp.choices[0].text is not None
    assert worker_pids(server) and worker_pids(server) != [pid]


def test_worker_killed_during_non_stream_request_is_503(server: Server) -> None:
    result: dict[str, httpx.Response] = {}

    def call() -> None:
        result["r"] = httpx.post(server.v1 + "/completions", timeout=120, json={
            "model": MODEL, "prompt": "Tell me a story", "max_tokens": 400,
            "logit_bias": {"1": -100, "106": -100}})

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.0)
    for pid in worker_pids(server):
        os.kill(pid, signal.SIGKILL)
    t.join(60)
    r = result["r"]
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "engine_unavailable"
    ok = httpx.post(server.v1 + "/completions", timeout=60, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_full_queue_is_429_with_retry_after(server: Server) -> None:
    streams = [long_stream(server, 300, seed=i) for i in range(3)]  # 2 slots + 1 queued
    opened = [s.__enter__() for s in streams]
    try:
        for r in opened:
            assert r.status_code == 200
        r = httpx.post(server.v1 + "/completions", timeout=60, json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    time.sleep(0.5)
    r = httpx.post(server.v1 + "/completions", timeout=60, json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_a_request_needing_more_generations_than_the_server_holds_is_a_400_not_a_429(server: Server) -> None:
    """2 slots + 1 queued: 2 prompts x n=2 can never fit; a 429 would be retried by the SDK in vain."""
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="4 generations at once.*at most 3") as exc:
        client.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=1)
    assert exc.value.body["param"] == "prompt"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="n=4 asks for 4 generations"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=4, max_tokens=1)
    assert len(client.completions.create(model=MODEL, prompt=["a", "b", "c"], max_tokens=1).choices) == 3


def test_ollama_num_ctx_is_a_per_request_limit(server: Server) -> None:
    body = {"model": MODEL, "prompt": "one two three four five six seven eight nine ten " * 3,
            "stream": False, "options": {"num_ctx": 16, "num_predict": 4}}
    r = httpx.post(server.url + "/api/generate", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "16" in r.json()["error"]
    small = httpx.post(server.url + "/api/generate", timeout=60, json={
        "model": MODEL, "prompt": "Hi", "stream": False, "raw": True,
        "options": {"num_ctx": 32, "temperature": 0, "seed": 1}})
    assert small.status_code == 200, small.text
    out = small.json()
    assert out["prompt_eval_count"] + out["eval_count"] <= 32
    assert out["done_reason"] == "length"
