"""Log probabilities on the in-box engine with the real model, through the real openai and ollama clients."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.conftest import Server
from tests.openai_schema import validate

pytestmark = pytest.mark.model
MODEL = "gemma3-270m:latest"
ASK: list[Any] = [{"role": "user", "content": "Name three fruits."}]


def check_entries(entries: list[Any], text: str, top: int) -> None:
    """One entry per token, in order, adding up to the text; greedy picks the likeliest."""
    assert "".join(e.token for e in entries) == text
    for e in entries:
        assert e.logprob <= 0
        raw = getattr(e, "bytes", None)  # the ollama openai_real's type has no `bytes` (the API sends them)
        assert raw is None or bytes(raw).decode("utf-8", "replace") == e.token
        alts = e.top_logprobs or []
        assert len(alts) == top
        assert [a.logprob for a in alts] == sorted((a.logprob for a in alts), reverse=True)
        assert sum(math.exp(a.logprob) for a in alts) <= 1.0 + 1e-6
        if alts:  # temperature 0: the chosen token is the most likely one
            assert (alts[0].token, alts[0].logprob) == (e.token, pytest.approx(e.logprob))


def test_chat_logprobs(openai_real: openai.OpenAI, real_server: Server) -> None:
    resp = openai_real.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=3)
    choice = resp.choices[0]
    assert choice.logprobs and choice.logprobs.content
    check_entries(choice.logprobs.content, choice.message.content or "", 3)
    assert resp.usage and len(choice.logprobs.content) == resp.usage.completion_tokens
    plain = openai_real.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content
    body = {"model": MODEL, "messages": ASK, "max_tokens": 5, "logprobs": True, "top_logprobs": 2}
    validate(httpx.post(real_server.v1 + "/chat/completions", json=body, timeout=120).json(),
             "CreateChatCompletionResponse")


def test_chat_logprobs_stream_with_each_piece(openai_real: openai.OpenAI) -> None:
    chunks = list(openai_real.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0,
                                                 logprobs=True, stream=True))
    text, entries = "", []
    for c in chunks:
        if c.choices and c.choices[0].delta.content:
            text += c.choices[0].delta.content
            assert c.choices[0].logprobs and c.choices[0].logprobs.content
            assert "".join(e.token for e in c.choices[0].logprobs.content) == c.choices[0].delta.content
            entries += c.choices[0].logprobs.content
    check_entries(entries, text, 0)
    assert len(entries) == 12


def test_n_choices_each_have_their_own(openai_real: openai.OpenAI) -> None:
    resp = openai_real.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, n=2, seed=5,
                                          temperature=1.0, logprobs=True)
    for choice in resp.choices:
        assert choice.logprobs and "".join(e.token for e in choice.logprobs.content or []) == choice.message.content


def test_completion_logprobs(openai_real: openai.OpenAI, real_server: Server) -> None:
    resp = openai_real.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                     temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    text = resp.choices[0].text
    assert lp and lp.tokens and "".join(lp.tokens) == text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(len(d) <= 2 and max(d.values()) == pytest.approx(v)  # greedy: the chosen one is the likeliest
               for d, v in zip(lp.top_logprobs or [], lp.token_logprobs or []))
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "logprobs": 1}
    validate(httpx.post(real_server.v1 + "/completions", json=body, timeout=120).json(), "CreateCompletionResponse")
    raw = httpx.post(real_server.v1 + "/completions", json={**body, "stream": True, "max_tokens": 6,
                                                            "temperature": 0}, timeout=120).text
    events = [json.loads(x.removeprefix("data: ")) for x in raw.split("\n\n") if x.startswith("data: {")]
    pieces = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["text"]]
    offsets = [o for p in pieces for o in p["logprobs"]["text_offset"]]
    tokens = [t for p in pieces for t in p["logprobs"]["tokens"]]
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]  # offsets run across pieces


def test_ollama_generate_and_chat_logprobs(ollama_real: ollama.Client, real_server: Server) -> None:
    g = ollama_real.generate(model=MODEL, prompt="The capital of France is", logprobs=True, top_logprobs=2,
                      options={"num_predict": 6, "temperature": 0})
    check_entries(g.logprobs or [], g.response, 2)
    parts = list(ollama_real.chat(model=MODEL, messages=ASK, logprobs=True, stream=True,
                           options={"num_predict": 6, "temperature": 0}))
    entries = [e for p in parts for e in p.logprobs or []]
    check_entries(entries, "".join(p.message.content for p in parts), 0)
    assert len(entries) == 6
    body = {"model": MODEL, "messages": ASK, "stream": False, "logprobs": True, "top_logprobs": 1,
            "options": {"num_predict": 3}}
    validate(httpx.post(real_server.url + "/api/chat", json=body, timeout=120).json(), "ChatResponse",
             "ollama-openapi.yaml")
    assert ollama_real.generate(model=MODEL, prompt="Hi", options={"num_predict": 2}).logprobs is None


@pytest.mark.parametrize(("path", "extra", "says"), [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs must be 0 to 20"),
    ("/v1/completions", {"logprobs": 6}, "from 0 to 5"),
    ("/api/chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs must be 0 to 20"),
])
def test_bad_logprob_settings_are_a_400(real_server: Server, path: str, extra: dict[str, Any], says: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 2, **extra}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": ASK})
    r = httpx.post(real_server.url + path, json=body, timeout=120)
    assert r.status_code == 400 and says in r.text, r.text


def test_engines_without_logprobs_say_so(fake_server: Server) -> None:
    r = httpx.post(fake_server.v1 + "/chat/completions", timeout=30,
                   json={"model": "fake:latest", "messages": ASK, "logprobs": True})
    assert r.status_code == 400 and "does not return log probabilities" in r.json()["error"]["message"]
