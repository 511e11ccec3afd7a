"""Log probabilities through upstreams of both kinds, asked for and answered in both dialects.

The fake upstreams answer a logprobs request with each piece as one token
(logprob -0.5) and the alternatives asked for; the real llama-server is in
tests/test_managed_upstream.py.
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
from tests.fake_upstream import PIECES, FakePair, FakeUpstream
from tests.openai_schema import validate

ASK: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakePair]:
    f = FakePair()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def server(fakes: FakePair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from config_server(tmp_path_factory, "logprobs-home", fakes.config())


def pieces(fake: FakeUpstream) -> list[str]:
    return [*PIECES, f" {fake.port}"]


@pytest.mark.parametrize(("model", "which"), [("m@oai", "oai"), ("llamita:8b", "olla")])
def test_openai_chat_logprobs_from_either_upstream(server: Server, fakes: FakePair, model: str, which: str) -> None:
    fake = getattr(fakes, which)
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=30)
    resp = client.chat.completions.create(model=model, messages=ASK, logprobs=True, top_logprobs=2)
    sent = fake.bodies[-1]
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    entries = resp.choices[0].logprobs.content if resp.choices[0].logprobs else []
    assert [e.token for e in entries or []] == pieces(fake)
    assert all(e.logprob == -0.5 and [a.token for a in e.top_logprobs] == [e.token, "alt1"] for e in entries or [])
    streamed = client.chat.completions.create(model=model, messages=ASK, logprobs=True, stream=True)
    got = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert [e.token for e in got] == pieces(fake)
    # top_logprobs 0: an OpenAI upstream is asked for 1 (llama-server sends nothing for 0), hearth trims it
    assert fake.bodies[-1]["top_logprobs"] == (1 if which == "oai" else 0)
    assert all(e.top_logprobs == [] for e in got)
    plain = client.chat.completions.create(model=model, messages=ASK)
    assert plain.choices[0].logprobs is None and "logprobs" not in fake.bodies[-1]


def test_ollama_client_gets_an_openai_upstreams_logprobs(server: Server, fakes: FakePair) -> None:
    c = ollama.Client(host=server.url, timeout=30)
    parts = list(c.chat(model="m@oai", messages=ASK, logprobs=True, top_logprobs=1, stream=True))
    assert [e.token for p in parts for e in p.logprobs or []] == pieces(fakes.oai)
    res = c.generate(model="llamita:8b", prompt="hi", logprobs=True)
    assert [e.token for e in res.logprobs or []] == pieces(fakes.olla)
    assert fakes.olla.bodies[-1]["logprobs"] is True and fakes.olla.bodies[-1]["top_logprobs"] == 0
    body = {"model": "m@oai", "messages": ASK, "stream": False, "logprobs": True, "top_logprobs": 2}
    validate(httpx.post(server.url + "/api/chat", json=body, timeout=30).json(), "ChatResponse", "ollama-openapi.yaml")


def test_legacy_completion_logprobs_both_ways(server: Server, fakes: FakePair) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=30)
    resp = client.completions.create(model="m@oai", prompt="hi", logprobs=2)
    assert fakes.oai.bodies[-1]["logprobs"] == 2  # the legacy shape: a number
    lp = resp.choices[0].logprobs
    assert lp and lp.tokens == pieces(fakes.oai) and lp.token_logprobs == [-0.5] * len(lp.tokens)
    assert lp.top_logprobs and all(list(d) == [t, "alt1"] for d, t in zip(lp.top_logprobs, lp.tokens))
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    raw = httpx.post(server.v1 + "/completions", timeout=30,
                     json={"model": "llamita:8b", "prompt": "hi", "logprobs": 0}).json()
    validate(raw, "CreateCompletionResponse")
    assert raw["choices"][0]["logprobs"]["tokens"] == pieces(fakes.olla)


def test_streamed_events_match_the_spec(server: Server) -> None:
    body = {"model": "llamita:8b", "messages": ASK, "stream": True, "logprobs": True, "top_logprobs": 1}
    raw = httpx.post(server.v1 + "/chat/completions", json=body, timeout=30).text
    events = [json.loads(x.removeprefix("data: ")) for x in raw.split("\n\n") if x.startswith("data: {")]
    assert any(e["choices"] and e["choices"][0]["logprobs"] for e in events)
    for e in events:
        validate(e, "CreateChatCompletionStreamResponse")
