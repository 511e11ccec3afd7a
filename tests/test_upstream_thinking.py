"""Thinking models on upstreams: `think` / `reasoning_effort` passed on, reasoning kept apart from the answer.

Fake upstreams of both kinds (mode "think") send reasoning before the answer,
as Ollama (`message.thinking`) and vLLM/llama-server (`reasoning_content`) do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.conftest import Server, config_server
from tests.fake_upstream import PIECES, THOUGHTS, FakePair, FakeUpstream
from tests.openai_schema import validate

ASK: list[Any] = [{"role": "user", "content": "why is the sky blue?"}]
THOUGHT = "".join(THOUGHTS)


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakePair]:
    f = FakePair(mode="think", ollama_models=("qwen3:8b",))
    yield f
    f.stop()


@pytest.fixture(scope="module")
def server(fakes: FakePair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from config_server(tmp_path_factory, "thinking-home", fakes.config())


def answer(fake: FakeUpstream) -> str:
    return "".join(PIECES) + f" {fake.port}"


@pytest.mark.parametrize(("model", "which"), [("qwen3:8b", "olla"), ("m@oai", "oai")])
def test_ollama_client_gets_thinking_apart(server: Server, fakes: FakePair, model: str, which: str) -> None:
    fake = getattr(fakes, which)
    c = ollama.Client(host=server.url, timeout=30)
    res = c.chat(model=model, messages=ASK, think=True)
    assert (res.message.thinking, res.message.content) == (THOUGHT, answer(fake))
    parts = list(c.chat(model=model, messages=ASK, think=True, stream=True))
    thoughts = [p.message.thinking for p in parts if p.message.thinking]
    assert "".join(thoughts) == THOUGHT and "".join(p.message.content for p in parts) == answer(fake)
    first_text = next(i for i, p in enumerate(parts) if p.message.content)
    assert all(not p.message.thinking for p in parts[first_text:])  # reasoning comes first
    gen = c.generate(model=model, prompt="why?", think=True)
    assert gen.thinking == THOUGHT and gen.response == answer(fake)


def test_openai_client_gets_reasoning_content(server: Server, fakes: FakePair) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=30)
    resp = client.chat.completions.create(model="qwen3:8b", messages=ASK)
    message = resp.choices[0].message
    assert message.content == answer(fakes.olla)
    assert (message.model_extra or {}).get("reasoning_content") == THOUGHT
    stream = list(client.chat.completions.create(model="m@oai", messages=ASK, stream=True))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in stream if c.choices)
    assert reasoning == THOUGHT
    raw = httpx.post(server.v1 + "/chat/completions", json={"model": "m@oai", "messages": ASK}, timeout=30).json()
    validate(raw, "CreateChatCompletionResponse")


@pytest.mark.parametrize(("ask", "which", "sent"), [
    ({"think": True}, "olla", {"think": True}),
    ({"think": "high"}, "olla", {"think": "high"}),
    ({"think": False}, "olla", {"think": False}),
    ({"think": "high"}, "oai", {"reasoning_effort": "high"}),
    ({"think": False}, "oai", {"chat_template_kwargs": {"enable_thinking": False}}),
    ({"think": True}, "oai", {"chat_template_kwargs": {"enable_thinking": True}}),  # was sent nothing
    ({"options": {"repeat_last_n": 32}}, "oai", {"repeat_last_n": 32}),  # llama-server takes it: not dropped
])
def test_think_is_passed_on_in_the_upstreams_terms(server: Server, fakes: FakePair, ask: dict[str, Any], which: str,
                                                   sent: dict[str, Any]) -> None:
    fake = getattr(fakes, which)
    model = "qwen3:8b" if which == "olla" else "m@oai"
    r = httpx.post(server.url + "/api/chat", json={"model": model, "messages": ASK, "stream": False, **ask}, timeout=30)
    assert r.status_code == 200, r.text
    body = fake.bodies[-1]
    assert {k: body.get(k) for k in sent} == sent


def test_openai_reasoning_effort_reaches_an_ollama_upstream(server: Server, fakes: FakePair) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=30)
    client.chat.completions.create(model="qwen3:8b", messages=ASK, reasoning_effort="low")
    assert fakes.olla.bodies[-1]["think"] == "low"
    client.chat.completions.create(model="qwen3:8b", messages=ASK, reasoning_effort="none")
    assert fakes.olla.bodies[-1]["think"] is False
    client.chat.completions.create(model="qwen3:8b", messages=ASK)
    assert "think" not in fakes.olla.bodies[-1]


def test_streamed_ollama_lines_match_the_spec(server: Server) -> None:
    raw = httpx.post(server.url + "/api/chat", json={"model": "qwen3:8b", "messages": ASK, "think": True},
                     timeout=30).text
    lines = [json.loads(x) for x in raw.splitlines() if x]
    assert any(x["message"].get("thinking") for x in lines)
    for x in lines:
        validate(x, "ChatStreamEvent" if not x["done"] else "ChatResponse", "ollama-openapi.yaml")


def test_think_on_a_model_that_cannot_is_a_400(server: Server) -> None:
    c = ollama.Client(host=server.url, timeout=30)
    with pytest.raises(ollama.ResponseError, match="does not support thinking"):
        c.chat(model="fake:latest", messages=ASK, think=True)
    assert c.chat(model="fake:latest", messages=ASK, think=False).message.content  # off is always fine
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="does not support reasoning") as exc:
        client.chat.completions.create(model="fake:latest", messages=ASK, reasoning_effort="low")
    assert exc.value.body["param"] == "reasoning_effort"  # type: ignore[index]  # the field it sent, not Ollama's
    r = httpx.post(server.url + "/api/chat", json={"model": "qwen3:8b", "messages": ASK, "think": "lots"}, timeout=30)
    assert r.status_code == 400 and "think must be true, false or one of" in r.text
