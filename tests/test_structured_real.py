"""Structured output on the real model: grammar-enforced JSON that validates, failing closed."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.model
MODEL = "gemma3-270m:latest"

SCHEMAS = {
    "object": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                "age": {"type": "integer"}},
               "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
             "required": ["color"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                        "minItems": 1, "maxItems": 3}},
              "required": ["tags"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer"}},
                "required": ["kind", "legs"], "additionalProperties": False},
        "ok": {"type": "boolean"}}, "required": ["pet", "ok"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def client(real_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server.v1, api_key="x", max_retries=0, timeout=120)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_validates(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Give me a {name} as JSON."}], max_tokens=120,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}})
    content = resp.choices[0].message.content or ""
    jsonschema.validate(json.loads(content), schema)
    assert resp.choices[0].finish_reason == "stop"


def test_json_object_mode(client: openai.OpenAI) -> None:
    prompt = 'JSON: {"animal": "cat", "legs": 4}\nJSON: {"animal": "dog", "legs": 4}\nJSON:'
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=100, temperature=0,
                                     extra_body={"response_format": {"type": "json_object"}})
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(resp.choices[0].text), dict)


def test_streamed_json_schema(client: openai.OpenAI) -> None:
    schema = SCHEMAS["enum"]
    chunks = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Pick a color."}], max_tokens=40, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}, seed=3)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_unsupported_keyword_is_400(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}, "required": ["n"]}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=20,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert "minimum" in str(exc.value)
    best_effort = client.chat.completions.create(  # strict: false asks for best effort, not a refusal
        model=MODEL, messages=[{"role": "user", "content": "A number as JSON."}], max_tokens=20, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": False}})
    assert isinstance(json.loads(best_effort.choices[0].message.content or "")["n"], int)  # the grammar's part


def test_token_limit_before_json_complete_is_explicit(client: openai.OpenAI) -> None:
    schema = SCHEMAS["object"]
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "A person as JSON."}], max_tokens=3,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    assert exc.value.status_code == 422
    assert "finish_reason=length" in str(exc.value)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person as JSON."}], max_tokens=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    finishes = []
    with pytest.raises(openai.APIError) as exc2:
        for c in stream:
            finishes += [ch.finish_reason for ch in c.choices if ch.finish_reason]
    assert finishes == ["length"]
    assert "finish_reason=length" in str(exc2.value)
