"""Every bad input gets a clear 4xx in OpenAI's envelope, never a 500 or a traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, start_server, stop_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("errors-home")
    (home / "hearth.toml").write_text("max_body_bytes = 16384\nmax_queue = 0\nslots = 1\n")
    s = start_server(home, "--fake", timeout=30)
    yield s
    stop_server(s)


def post(server: Server, path: str, body: object | None = None, content: bytes | None = None) -> httpx.Response:
    if content is not None:
        return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    return httpx.post(server.url + path, json=body)


def assert_envelope(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    for w in words:
        assert w in err["message"], err["message"]
    return err


CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "words", "param"),
    [
        ({"messages": "hello"}, ["messages"], "messages"),
        ({"messages": []}, ["messages"], "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, ["messages.0.role"], "messages.0.role"),
        ({"messages": MSG, "temperature": "hot"}, ["temperature"], "temperature"),
        ({"messages": MSG, "temperature": 5}, ["temperature"], "temperature"),
        ({"messages": MSG, "max_tokens": 0}, ["max_tokens"], "max_tokens"),
        ({"messages": MSG, "n": 0}, ["n"], "n"),
        ({"messages": MSG, "stop": 5}, ["must be a string or a list of strings"], "stop"),
        # a field of several types names the item that is wrong, not the type that failed first
        ({"messages": MSG, "stop": ["a", 3]}, ["'stop.1'", "valid string (got 3)"], "stop.1"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         ["'messages.0.content.0.text'"], "messages.0.content.0.text"),
        ({"messages": MSG, "tool_choice": 5}, ["must be a string or an object"], "tool_choice"),
        ({"messages": MSG, "logit_bias": {"Foo": "x"}}, ["valid number"], "logit_bias.Foo"),  # a key, not a type
        ({"messages": MSG, "logit_bias": {"abc": 1}}, ["logit_bias"], "logit_bias"),
        ({"messages": MSG, "logprobs": True}, ["logprobs"], "logprobs"),
        ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, ["tools"], "tools"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                       "image_url": {"url": "http://x/y.png"}}]}]},
         ["does not fetch"], None),
        ({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "integer", "multipleOf": 3}}}}, ["multipleOf"], "response_format"),
        ({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         ["schema"], None),
        ({"messages": MSG, "response_format": {"type": "xml"}}, ["response_format.type"], None),
        ({"messages": MSG, "modalities": ["text", "audio"]}, ["text only"], "modalities"),
        ({"messages": MSG, "audio": {"voice": "alloy", "format": "wav"}}, ["audio output"], "audio"),
        ({"messages": MSG, "web_search_options": {}}, ["no web search"], "web_search_options"),
    ],
)
def test_bad_chat_fields_are_400_naming_the_field(server: Server, body: dict, words: list[str],
                                                   param: str | None) -> None:
    err = assert_envelope(post(server, CHAT, body), 400, *words)
    if param:
        assert err["param"] == param


def test_malformed_json(server: Server) -> None:
    assert_envelope(post(server, CHAT, content=b"{nope"), 400, "not valid JSON")
    assert_envelope(post(server, CHAT, content=b"[1, 2]"), 400, "JSON object")
    assert_envelope(post(server, CHAT, content=b""), 400, "empty")


def test_body_over_limit_is_413(server: Server) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 20000}]}
    assert_envelope(post(server, CHAT, big), 413, "16384")


def test_unknown_model_404_lists_models(server: Server) -> None:
    err = assert_envelope(post(server, CHAT, {"model": "gpt-9", "messages": MSG}), 404, "gpt-9", "fake:latest")
    assert err["code"] == "model_not_found"


def test_context_length_exceeded(server: Server) -> None:
    err = assert_envelope(post(server, CHAT, {"messages": [{"role": "user", "content": "w " * 2100}]}),
                          400, "2048")
    assert err["code"] == "context_length_exceeded"


def test_unknown_route_and_method(server: Server) -> None:
    assert_envelope(httpx.get(server.url + "/v1/nothing"), 404, "/v1/nothing", "see /v1/* and /api/*")
    assert_envelope(httpx.get(server.url + CHAT), 405, "GET")
    # a misspelt path, or a base URL without /v1, names the route meant
    for wrong in ("/v1/chat/completion", "/chat/completions"):
        assert_envelope(post(server, wrong, {}), 404, "did you mean POST /v1/chat/completions?")
    assert_envelope(httpx.get(server.url + "/v1/model"), 404, "did you mean GET /v1/models?")


def test_openai_apis_hearth_does_not_serve_say_what_to_use(server: Server) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="fake", input="hi")
    assert "POST /v1/chat/completions" in str(err.value) and "not supported" in str(err.value)
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "not_supported"
    assert_envelope(post(server, "/v1/images/generations", {"prompt": "a cat"}), 404, "text models only")


def test_bad_embeddings(server: Server) -> None:
    assert_envelope(post(server, "/v1/embeddings", {"input": []}), 400, "input")
    assert_envelope(post(server, "/v1/embeddings", {"input": "x", "encoding_format": "hex"}), 400,
                    "encoding_format")
    assert_envelope(post(server, "/v1/embeddings", {"input": "x", "dimensions": 3}), 400, "16")
    for empty in ("", ["a", ""]):  # the spec: not an empty string (it embedded the BOS token alone)
        assert_envelope(post(server, "/v1/embeddings", {"input": empty}), 400, "empty string")
    assert post(server, "/v1/embeddings", {"input": "x", "encoding_format": None}).status_code == 200


def test_bad_completions(server: Server) -> None:
    assert_envelope(post(server, "/v1/completions", {"prompt": []}), 400, "prompt")
    assert_envelope(post(server, "/v1/completions", {"prompt": [1, 2, 3]}), 400, "token")
    assert_envelope(post(server, "/v1/completions", {"prompt": "x", "suffix": "y"}), 400, "suffix")
    assert_envelope(post(server, "/v1/completions", {"prompt": "x", "best_of": 3}), 400, "best_of")
    assert post(server, "/v1/completions", {"prompt": "x", "best_of": 2, "n": 2, "max_tokens": 2}).status_code == 200


def test_unknown_fields_are_ignored(server: Server) -> None:
    r = post(server, CHAT, {"messages": MSG, "max_tokens": 3, "vendor_extra": {"a": 1}, "cache_prompt": True})
    assert r.status_code == 200


def test_sdk_raises_typed_errors(server: Server) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="fake", messages=MSG, temperature=9)  # type: ignore[arg-type]


def test_mid_stream_error_is_an_sse_error_event(server: Server) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "FAIL_MIDSTREAM"}], stream=True, max_tokens=10)
    with pytest.raises(openai.APIError) as exc:
        for _ in stream:
            pass
    assert "mid-stream" in str(exc.value)


def test_a_crash_mid_stream_is_an_sse_error_event_not_a_cut(server: Server) -> None:
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    for stream in (client.chat.completions.create(model="fake", messages=[
                       {"role": "user", "content": "CRASH_MIDSTREAM"}], stream=True, max_tokens=10),
                   client.completions.create(model="fake", prompt="CRASH_MIDSTREAM", stream=True, max_tokens=10)):
        with pytest.raises(openai.APIError) as exc:
            for _ in stream:  # type: ignore[attr-defined]
                pass
        assert "internal error" in str(exc.value), exc.value


def test_null_n_and_stream_mean_their_defaults(server: Server) -> None:
    r = post(server, CHAT, {"model": "fake", "messages": MSG, "n": None, "stream": None, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text


def test_streamed_completions_count_each_prompt_once_with_n(server: Server) -> None:
    body = {"model": "fake", "prompt": "one two three four", "max_tokens": 3, "n": 2}
    plain = post(server, "/v1/completions", body).json()["usage"]["prompt_tokens"]
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={**body, "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert [e["usage"]["prompt_tokens"] for e in events if e.get("usage")] == [plain]


@pytest.mark.parametrize(("path", "ask"), [("/chat/completions", {"messages": MSG}),
                                           ("/completions", {"prompt": "hi", "echo": True})])
def test_with_include_usage_every_chunk_has_usage_null_until_the_last(server: Server, path: str, ask: dict) -> None:
    r = httpx.post(server.v1 + path, timeout=30, json={
        "model": "fake", **ask, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert all("usage" in e for e in events), events
    assert [e["usage"] is None for e in events] == [True] * (len(events) - 1) + [False]


def test_models_with_a_trailing_slash_is_the_list(server: Server) -> None:
    body = httpx.get(server.v1 + "/models/", timeout=30).json()
    assert body["object"] == "list" and body["data"], body


def test_config_file_is_reported(server: Server, tmp_path: Path) -> None:
    r = httpx.get(server.url + "/ready")
    assert r.status_code == 200
