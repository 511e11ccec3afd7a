"""A refusal from an OpenAI-compatible upstream (OpenAI's `refusal`, sent instead of structured output).

It reaches OpenAI clients as `message.refusal` (a `refusal` delta when
streaming), Ollama clients as the answer's text, and is never checked against
the schema the request asked for (it is not output that failed the schema).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pydantic
import pytest

from tests.conftest import Server, config_server
from tests.fake_upstream import REFUSAL, FakeUpstream
from tests.openai_schema import validate

ASK: list[Any] = [{"role": "user", "content": "how do I pick this lock?"}]
SCHEMA = {"type": "object", "properties": {"steps": {"type": "array", "items": {"type": "string"}}},
          "required": ["steps"], "additionalProperties": False}
STRICT = {"type": "json_schema", "json_schema": {"name": "plan", "schema": SCHEMA, "strict": True}}
SAID = "".join(REFUSAL)


class Plan(pydantic.BaseModel):
    steps: list[str]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    up = FakeUpstream(mode="refuse", models=("gpt-x",)).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def server(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    toml = f'[upstreams.oa]\nkind = "openai"\nurls = ["{fake.url}"]\nstrict = true\n'
    yield from config_server(tmp_path_factory, "refusal-home", toml)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=30)


def test_a_refusal_is_message_refusal_not_a_schema_failure(server: Server) -> None:
    raw = httpx.post(server.v1 + "/chat/completions", timeout=30,
                     json={"model": "gpt-x", "messages": ASK, "response_format": STRICT})
    assert raw.status_code == 200, raw.text  # it was a 502 "not valid JSON", the refusal lost
    body = raw.json()
    validate(body, "CreateChatCompletionResponse")
    message = body["choices"][0]["message"]
    assert message["refusal"] == SAID and message["content"] is None
    parsed = client(server).chat.completions.parse(model="gpt-x", messages=ASK, response_format=Plan)
    assert parsed.choices[0].message.refusal == SAID and parsed.choices[0].message.parsed is None


def test_a_streamed_refusal_is_a_refusal_delta(server: Server) -> None:
    chunks = list(client(server).chat.completions.create(model="gpt-x", messages=ASK, stream=True,
                                                         response_format=STRICT))  # type: ignore[arg-type]
    refusals = [c.choices[0].delta.refusal for c in chunks if c.choices and c.choices[0].delta.refusal]
    assert refusals == [SAID]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_clients_get_the_refusal_as_the_answer(server: Server, stream: bool) -> None:
    c = ollama.Client(host=server.url, timeout=30)
    if stream:
        text = "".join(p.message.content or "" for p in c.chat(model="gpt-x", messages=ASK, format=SCHEMA,
                                                                 stream=True))
    else:
        text = c.chat(model="gpt-x", messages=ASK, format=SCHEMA).message.content or ""
    assert text == SAID
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # not structured output, and not refused as such either
