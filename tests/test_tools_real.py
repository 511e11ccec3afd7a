"""Tool calling on the in-box engine with the real bundled model, through the real openai and ollama clients.

The bundled model is a small base model without a tool template, so it gets
hearth's tool prompt; `tool_choice` "required" or a named function is
enforced by a grammar, which makes even this model answer with a valid call.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest

from hearth.engines.llamacpp import tool_calls
from tests.conftest import Server
from tests.openai_schema import validate

pytestmark = pytest.mark.model
MODEL = "gemma3-270m:latest"
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                  "unit": {"enum": ["C", "F"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
ADD_PARAMS = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "required": ["a", "b"], "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD_PARAMS}},
]
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
# The model called get_weather before; its result is in. A base model goes on in the pattern it sees.
OLLAMA_HISTORY: list[Any] = [
    *ASK,
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                      "arguments": {"city": "Paris", "unit": "C"}}}]},
    {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"},
]


def test_named_function_is_called_with_valid_arguments(openai_real: openai.OpenAI, real_server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2 plus 3?"}], "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "add"}}, "temperature": 0, "max_tokens": 60}
    resp = openai_real.chat.completions.create(**body)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "add" and calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].function.arguments), ADD_PARAMS)
    assert resp.usage and resp.usage.completion_tokens > 0
    validate(httpx.post(real_server.v1 + "/chat/completions", json=body, timeout=120).json(),
             "CreateChatCompletionResponse")


def test_required_streams_one_whole_call(openai_real: openai.OpenAI) -> None:
    stream = openai_real.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=80, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function and calls[0].id
    name, args = calls[0].function.name, json.loads(calls[0].function.arguments or "")
    jsonschema.validate(args, WEATHER_PARAMS if name == "get_weather" else ADD_PARAMS)
    assert not "".join(d.content or "" for d in deltas)  # no call text leaks out as content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens > 0


def test_auto_text_then_a_call_that_follows_the_schema(openai_real: openai.OpenAI) -> None:
    """"auto": the model writes freely; once it opens a call, a lazy grammar keeps the call well-formed.
    (This base model echoes the tool prompt first and then opens a call: text, then the call.)"""
    chunks = list(openai_real.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0,
                                                      max_tokens=80, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    text = "".join(d.content or "" for d in deltas)
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].function and calls[0].function.name in ("get_weather", "add"), text
    params = WEATHER_PARAMS if calls[0].function.name == "get_weather" else ADD_PARAMS
    jsonschema.validate(json.loads(calls[0].function.arguments or ""), params)
    assert "<tool_call>" not in text  # the marker went into the call, not the content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_parallel_calls_only_when_asked(openai_real: openai.OpenAI) -> None:
    """One call unless parallel_tool_calls is true. This small model, allowed more, goes on calling
    until the grammar's bound or max_tokens: the whole calls come back, never one cut in half."""
    ask = [{"role": "user", "content": "Weather in Paris and in Rome?"}]
    one = openai_real.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS[:1], tool_choice="required",
                                         temperature=0, max_tokens=200)
    assert len(one.choices[0].message.tool_calls or []) == 1 and one.choices[0].finish_reason == "tool_calls"
    assert one.usage and one.usage.completion_tokens < 60  # it stopped after its call
    many = openai_real.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS[:1], tool_choice="required",
                                               temperature=0, max_tokens=200, parallel_tool_calls=True)
    calls = many.choices[0].message.tool_calls or []
    assert 2 <= len(calls) <= tool_calls.MAX_CALLS  # "length" if max_tokens cut a further call
    assert many.choices[0].finish_reason in ("tool_calls", "length")
    assert all(json.loads(c.function.arguments).get("city") for c in calls)  # each one whole
    assert "<tool_call>" not in (many.choices[0].message.content or "")


def test_ollama_history_with_results_and_auto_call(ollama_real: ollama.Client) -> None:
    res = ollama_real.chat(model=MODEL, messages=OLLAMA_HISTORY, tools=TOOLS, options={"temperature": 0, "num_predict": 60})
    calls = res.message.tool_calls or []
    # The model's own call text, read back: arguments are an object in Ollama's dialect.
    assert calls and calls[0].function.name == "get_weather", res.message
    assert isinstance(calls[0].function.arguments, dict) and calls[0].function.arguments.get("city") == "Paris"
    assert res.done_reason == "stop" and "<tool_call>" not in (res.message.content or "")
    without = ollama_real.chat(model=MODEL, messages=ASK, tools=TOOLS, options={"temperature": 0, "num_predict": 1})
    assert (res.prompt_eval_count or 0) > (without.prompt_eval_count or 0) + 15  # the call and result were rendered


def test_ollama_stream_sends_the_call_as_one_piece(ollama_real: ollama.Client, real_server: Server) -> None:
    parts = list(ollama_real.chat(model=MODEL, messages=OLLAMA_HISTORY, tools=TOOLS, stream=True,
                           options={"temperature": 0, "num_predict": 60}))
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert "<tool" not in "".join(p.message.content or "" for p in parts)
    assert parts[-1].done
    body = {"model": MODEL, "messages": OLLAMA_HISTORY, "tools": TOOLS, "stream": False,
            "options": {"temperature": 0, "num_predict": 60}}
    validate(httpx.post(real_server.url + "/api/chat", json=body, timeout=120).json(), "ChatResponse",
             "ollama-openapi.yaml")


def test_openai_history_answers_after_a_tool_result(openai_real: openai.OpenAI) -> None:
    """An OpenAI-shaped history (ids, arguments as text) renders too; tool_choice none gives text only."""
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": '{"city": "Paris", "unit": "C"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "18 degrees and sunny"}]
    resp = openai_real.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=20)
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage and resp.usage.prompt_tokens > 40


def test_tools_with_response_format_is_a_clear_400(openai_real: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        openai_real.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, response_format={"type": "json_object"})
    assert "either `tools` or `response_format`" in str(err.value)


def test_in_box_models_show_the_tools_capability(ollama_real: ollama.Client) -> None:
    assert "tools" in (ollama_real.show(MODEL).capabilities or [])
