"""Tool calling through upstreams, in both dialects, with the real `openai` and `ollama` clients.

Fake upstreams (tests/fake_upstream.py, mode "tools") answer a request that
has `tools` with two calls: an OpenAI-compatible one as deltas in pieces, an
Ollama one as whole calls. hearth must put the pieces together, translate
calls and histories between dialects, and refuse tools on an engine that
cannot call them.
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
from tests.fake_upstream import CALLS, FakePair, FakeUpstream
from tests.openai_schema import validate

TOOLS = [{"type": "function", "function": {
    "name": name, "description": f"{name} tool",
    "parameters": {"type": "object", "properties": {k: {"type": "string"} for k in args}}}}
    for name, args in CALLS]
ASK = [{"role": "user", "content": "weather and time in Tokyo?"}]


class Fakes(FakePair):
    """The OpenAI and Ollama fakes answering with tool calls, and one sending arguments that are not JSON."""

    def __init__(self) -> None:
        super().__init__(mode="tools")
        self.bad = FakeUpstream(mode="bad_args", models=("b",)).start()

    def config(self) -> str:
        return super().config() + f'\n[upstreams.bad]\nkind = "openai"\nurls = ["{self.bad.url}"]\nmodels = ["b"]\n'

    def stop(self) -> None:
        super().stop()
        self.bad.stop()


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    f = Fakes()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def server(fakes: Fakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from config_server(tmp_path_factory, "tools-home", fakes.config())


def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=30)


def olla(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=30)


def expected() -> list[tuple[str, dict[str, Any]]]:
    return [(name, args) for name, args in CALLS]


@pytest.mark.parametrize("model", ["m@oai", "llamita:8b"])
def test_openai_client_gets_whole_tool_calls(server: Server, fakes: Fakes, model: str) -> None:
    out = oai(server).chat.completions.create(model=model, messages=ASK, tools=TOOLS)  # type: ignore[arg-type]
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == expected()
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == 2
    assert out.usage is not None and out.usage.completion_tokens == 12
    fake = fakes.oai if model == "m@oai" else fakes.olla
    assert fake.bodies[-1]["tools"] == TOOLS


@pytest.mark.parametrize("model", ["m@oai", "llamita:8b"])
def test_openai_stream_carries_tool_call_deltas(server: Server, model: str) -> None:
    stream = oai(server).chat.completions.create(model=model, messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                                 stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                c["id"] += d.id or ""
                c["name"] += (d.function.name if d.function else None) or ""
                c["arguments"] += (d.function.arguments if d.function else None) or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == expected()
    assert all(c["id"] for c in calls.values())


@pytest.mark.parametrize("model", ["m@oai", "llamita:8b"])
@pytest.mark.parametrize("stream", [False, True])
def test_ollama_client_gets_tool_calls_with_object_arguments(server: Server, model: str, stream: bool) -> None:
    c = olla(server)
    if stream:
        parts = list(c.chat(model=model, messages=ASK, tools=TOOLS, stream=True))
        calls = [t for p in parts for t in (p.message.tool_calls or [])]
        assert parts[-1].done and parts[-1].done_reason == "stop"
    else:
        res = c.chat(model=model, messages=ASK, tools=TOOLS)
        calls = res.message.tool_calls or []
        assert res.done_reason == "stop"
    assert [(t.function.name, dict(t.function.arguments)) for t in calls] == expected()


def test_tool_choice_is_passed_to_openai_upstreams_and_dropped_for_ollama(server: Server, fakes: Fakes) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    oai(server).chat.completions.create(model="m@oai", messages=ASK, tools=TOOLS, tool_choice=choice,  # type: ignore
                                        parallel_tool_calls=False)
    sent = fakes.oai.bodies[-1]
    assert sent["tool_choice"] == choice and sent["parallel_tool_calls"] is False
    oai(server).chat.completions.create(model="llamita:8b", messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                        tool_choice="required")
    assert "tool_choice" not in fakes.olla.bodies[-1] and len(fakes.olla.bodies[-1]["tools"]) == 2
    assert "does not support 'tool_choice'" in server.log()
    # Ollama cannot force a call: "none" sends no tools, a named function only that one
    oai(server).chat.completions.create(model="llamita:8b", messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                        tool_choice="none")
    assert "tools" not in fakes.olla.bodies[-1]
    oai(server).chat.completions.create(model="llamita:8b", messages=ASK, tools=TOOLS,  # type: ignore[arg-type]
                                        tool_choice=choice)  # type: ignore[arg-type]
    assert [t["function"]["name"] for t in fakes.olla.bodies[-1]["tools"]] == ["get_time"]


def _history_openai() -> list[dict[str, Any]]:
    return [*ASK,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}},
                {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_b", "content": "10:00"},
            {"role": "tool", "tool_call_id": "call_a", "content": "11 C"}]


def test_openai_history_reaches_an_ollama_upstream_by_tool_name(server: Server, fakes: Fakes) -> None:
    out = oai(server).chat.completions.create(model="llamita:8b", messages=_history_openai())  # type: ignore
    assert out.choices[0].message.content.startswith("Hello from upstream")
    sent = fakes.olla.bodies[-1]["messages"]
    assert sent[1]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
                                     {"function": {"name": "get_time", "arguments": {}}}]
    assert [(m["role"], m.get("tool_name"), m["content"]) for m in sent[2:]] == [
        ("tool", "get_time", "10:00"), ("tool", "get_weather", "11 C")]


def test_ollama_history_reaches_an_openai_upstream_with_matching_ids(server: Server, fakes: Fakes) -> None:
    history = [*ASK,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}},
                   {"function": {"name": "get_time", "arguments": {}}}]},
               {"role": "tool", "tool_name": "get_time", "content": "10:00"},
               {"role": "tool", "content": "11 C"}]  # no name: answers the call still open
    res = olla(server).chat(model="m@oai", messages=history)
    assert res.message.content.startswith("Hello from upstream")
    sent = fakes.oai.bodies[-1]["messages"]
    ids = {c["function"]["name"]: c["id"] for c in sent[1]["tool_calls"]}
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Tokyo"}
    assert sent[2]["tool_call_id"] == ids["get_time"] and sent[2]["name"] == "get_time"
    assert sent[3]["tool_call_id"] == ids["get_weather"] and sent[3]["name"] == "get_weather"
    assert len(set(ids.values())) == 2 and all(ids.values())


def test_arguments_that_are_not_an_object_fail_in_the_ollama_dialect(server: Server) -> None:
    out = oai(server).chat.completions.create(model="b", messages=ASK, tools=TOOLS)  # type: ignore[arg-type]
    assert out.choices[0].message.tool_calls[0].function.arguments == "{city: Tokyo}"  # OpenAI keeps text as is
    r = httpx.post(server.url + "/api/chat", json={"model": "b", "messages": ASK, "tools": TOOLS, "stream": False},
                   timeout=30)
    assert r.status_code == 502 and "not a JSON object" in r.json()["error"]
    lines = [json.loads(x) for x in httpx.post(server.url + "/api/chat", json={
        "model": "b", "messages": ASK, "tools": TOOLS}, timeout=30).text.splitlines()]
    assert "not a JSON object" in lines[-1]["error"]


def test_engine_without_tools_refuses_them_by_name(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai(server).chat.completions.create(model="fake:latest", messages=ASK, tools=TOOLS)  # type: ignore
    assert "engine 'fake'" in str(err.value) and "does not support tool calling" in str(err.value)
    out = oai(server).chat.completions.create(model="fake:latest", messages=ASK, tools=TOOLS,  # type: ignore
                                              tool_choice="none")
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls
    with pytest.raises(ollama.ResponseError) as oerr:
        olla(server).chat(model="fake:latest", messages=[*ASK, {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_time", "arguments": {}}}]}])
    assert oerr.value.status_code == 400 and "tool calling" in str(oerr.value)


@pytest.mark.parametrize(("extra", "says"), [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "only function tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tool_choice": "required"}, "needs `tools`"),
    ({"functions": [{"name": "f"}]}, "deprecated form of `tools`"),
    ({"tools": TOOLS, "function_call": "auto"}, "deprecated form of `tool_choice`"),
])
def test_bad_tools_are_a_400_that_says_what_is_wrong(server: Server, extra: dict[str, Any], says: str) -> None:
    r = httpx.post(server.v1 + "/chat/completions", json={"model": "m@oai", "messages": ASK, **extra}, timeout=30)
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/api/chat", json={"model": "m@oai", "messages": ASK, "stream": False,
                                                   "tools": extra.get("tools", [])}, timeout=30)
    assert r.status_code == (400 if "tools" in extra and extra["tools"] is not TOOLS else 200)


def test_tool_call_answers_match_the_published_specs(server: Server) -> None:
    body = {"model": "m@oai", "messages": ASK, "tools": TOOLS}
    validate(httpx.post(server.v1 + "/chat/completions", json=body, timeout=30).json(),
             "CreateChatCompletionResponse")
    raw = httpx.post(server.v1 + "/chat/completions", json={**body, "stream": True}, timeout=30).text
    events = [json.loads(x.removeprefix("data: ")) for x in raw.split("\n\n") if x.startswith("data: {")]
    assert any(e["choices"] and e["choices"][0]["delta"].get("tool_calls") for e in events)
    for e in events:
        validate(e, "CreateChatCompletionStreamResponse")
    res = httpx.post(server.url + "/api/chat", json={**body, "stream": False}, timeout=30).json()
    assert res["message"]["tool_calls"]
    validate(res, "ChatResponse", "ollama-openapi.yaml")


def test_upstream_chat_models_show_the_tools_capability(server: Server) -> None:
    assert "tools" in olla(server).show("llamita:8b").capabilities
    assert "tools" not in (olla(server).show("fake:latest").capabilities or [])


def test_each_of_n_choices_carries_its_own_tool_calls(server: Server) -> None:
    c = oai(server)
    out = c.chat.completions.create(model="m@oai", messages=ASK, tools=TOOLS, n=2)  # type: ignore[arg-type]
    for choice in out.choices:
        assert [t.function.name for t in choice.message.tool_calls or []] == ["get_weather", "get_time"]
    seen: dict[tuple[int, int], str] = {}
    for chunk in c.chat.completions.create(model="m@oai", messages=ASK, tools=TOOLS, n=2,  # type: ignore
                                           stream=True):
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                seen[(choice.index, d.index)] = d.function.name if d.function else ""
    assert seen == {(0, 0): "get_weather", (0, 1): "get_time", (1, 0): "get_weather", (1, 1): "get_time"}
