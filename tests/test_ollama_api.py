"""The Ollama dialect over HTTP against `hearth serve --fake`, bodies checked against Ollama's OpenAPI spec."""

from __future__ import annotations

import re

import base64
import json
import math
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import ollama
import pytest

from tests.conftest import Server, start_server, stop_server
from tests.openai_schema import validate as validate_spec

SPEC = "ollama-openapi.yaml"
USER = [{"role": "user", "content": "tell me about the hearth"}]


def validate(body: Any, schema: str) -> None:
    """Check `body` against a component schema of specs/ollama-openapi.yaml."""
    validate_spec(body, schema, SPEC)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("ollama-fake"), "--fake", timeout=30)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def lines(resp: httpx.Response) -> list[dict[str, Any]]:
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]


def check_timings(body: dict[str, Any]) -> None:
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"):
        assert isinstance(body[key], int) and body[key] >= 0, key
    assert body["total_duration"] >= body["eval_duration"] > 0
    assert body["prompt_eval_count"] > 0


def error_of(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    validate(body, "ErrorResponse")
    assert set(body) == {"error"}
    return body["error"]


# -- liveness and version -------------------------------------------------------------
def test_root_and_head(http: httpx.Client) -> None:
    resp = http.get("/")
    assert resp.status_code == 200 and resp.text == "Ollama is running"
    head = http.head("/")
    assert head.status_code == 200 and head.content == b""


def test_version(http: httpx.Client) -> None:
    body = http.get("/api/version").json()
    validate(body, "VersionResponse")
    assert all(part.isdigit() for part in body["version"].split("."))


# -- chat -------------------------------------------------------------------------------
def test_chat_streams_ndjson_by_default(http: httpx.Client) -> None:
    events = lines(http.post("/api/chat", json={"model": "fake", "messages": USER, "options": {"num_predict": 5}}))
    *pieces, last = events
    assert len(pieces) == 5
    for e in pieces:
        validate(e, "ChatStreamEvent")
        assert e["done"] is False and e["message"]["role"] == "assistant" and e["message"]["content"]
        datetime.fromisoformat(e["created_at"])
    validate(last, "ChatResponse")
    assert last["done"] is True and last["done_reason"] == "length" and last["message"]["content"] == ""
    assert last["eval_count"] == 5 and last["model"] == "fake"
    check_timings(last)


def test_chat_without_streaming_is_one_object(http: httpx.Client) -> None:
    body = {"model": "fake", "messages": [{"role": "system", "content": "be brief"}, *USER],
            "stream": False, "options": {"num_predict": 4, "seed": 42}}
    resp = http.post("/api/chat", json=body)
    assert resp.headers["content-type"] == "application/json"
    out = resp.json()
    validate(out, "ChatResponse")
    assert out["done"] is True and out["done_reason"] == "length" and out["eval_count"] == 4
    check_timings(out)
    streamed = lines(http.post("/api/chat", json={**body, "stream": True}))
    assert "".join(e["message"]["content"] for e in streamed) == out["message"]["content"]


def test_chat_stop_option_and_done_reason_stop(http: httpx.Client) -> None:
    base = {"model": "fake", "messages": USER, "stream": False, "options": {"seed": 5, "num_predict": 30}}
    full = http.post("/api/chat", json=base).json()["message"]["content"]
    word = full.split()[3]
    cut = http.post("/api/chat", json={**base, "options": {**base["options"], "stop": [" " + word]}}).json()
    assert cut["done_reason"] == "stop"
    assert cut["message"]["content"] == full[: full.index(" " + word)]


def test_unknown_fields_are_tolerated(http: httpx.Client) -> None:
    resp = http.post("/api/chat", json={"model": "fake", "messages": USER, "stream": False, "vendor_extra": 1,
                                        "options": {"num_predict": 1, "mirostat": 2}})
    assert resp.status_code == 200 and resp.json()["eval_count"] == 1


def test_structured_format_schema_and_json(http: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"fake": {"type": "boolean"}}, "required": ["fake"]}
    out = http.post("/api/chat", json={"model": "fake", "messages": USER, "format": schema, "stream": False}).json()
    assert json.loads(out["message"]["content"]) == {"fake": True}
    events = lines(http.post("/api/generate", json={"model": "fake", "prompt": "json please", "format": "json"}))
    assert events[-1]["done"] is True
    assert json.loads("".join(e["response"] for e in events)) == {"fake": True}


def test_structured_output_that_fails_the_schema_fails_closed(http: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    body = {"model": "fake", "messages": USER, "format": schema}
    assert "schema" in error_of(http.post("/api/chat", json={**body, "stream": False}), 422)
    events = lines(http.post("/api/chat", json=body))
    assert "error" in events[-1] and "schema" in events[-1]["error"]
    assert not any(e.get("done") for e in events)


def test_unenforceable_schema_keyword_is_a_400(http: httpx.Client) -> None:
    schema = {"type": "object", "patternProperties": {"^x": {"type": "string"}}}
    msg = error_of(http.post("/api/chat", json={"model": "fake", "messages": USER, "format": schema}), 400)
    assert "patternProperties" in msg


# -- generate ---------------------------------------------------------------------------
def test_generate_stream_and_not(http: httpx.Client) -> None:
    body = {"model": "fake", "prompt": "why is the sky blue?", "system": "be brief", "options": {"num_predict": 3}}
    events = lines(http.post("/api/generate", json=body))
    for e in events[:-1]:
        validate(e, "GenerateStreamEvent")
        assert e["response"] and e["done"] is False
    validate(events[-1], "GenerateResponse")
    check_timings(events[-1])
    out = http.post("/api/generate", json={**body, "stream": False}).json()
    validate(out, "GenerateResponse")
    assert out["done"] is True and out["eval_count"] == 3 and len(out["response"].split()) == 3


def test_generate_raw_and_template(http: httpx.Client) -> None:
    raw = http.post("/api/generate", json={"model": "fake", "prompt": "<turn>hi", "raw": True, "stream": False,
                                           "options": {"num_predict": 2}})
    assert raw.status_code == 200 and raw.json()["prompt_eval_count"] == 1
    tpl = http.post("/api/generate", json={"model": "fake", "prompt": "hi", "system": "sys words here",
                                           "template": "{{ .System }} USER: {{ .Prompt }}", "stream": False,
                                           "options": {"num_predict": 2}})
    assert tpl.status_code == 200 and tpl.json()["prompt_eval_count"] == 5  # "sys words here USER: hi"
    msg = error_of(http.post("/api/generate", json={"model": "fake", "prompt": "hi",
                                                    "template": "{{ range .Messages }}{{ end }}"}), 400)
    assert "range .Messages" in msg and "raw" in msg


def test_generate_suffix_is_refused(http: httpx.Client) -> None:
    msg = error_of(http.post("/api/generate", json={"model": "fake", "prompt": "def f():", "suffix": "  return"}), 400)
    assert "suffix" in msg


# -- load / unload / ps -------------------------------------------------------------------
def ps(http: httpx.Client) -> dict[str, dict[str, Any]]:
    body = http.get("/api/ps").json()
    validate(body, "PsResponse")
    return {m["name"]: m for m in body["models"]}


def test_empty_prompt_loads_and_keep_alive_zero_unloads(http: httpx.Client) -> None:
    loaded = lines(http.post("/api/generate", json={"model": "fake", "keep_alive": "10m"}))
    assert len(loaded) == 1 and loaded[0]["done"] is True and loaded[0]["done_reason"] == "load"
    validate(loaded[0], "GenerateResponse")
    entry = ps(http)["fake:latest"]
    expires = datetime.fromisoformat(entry["expires_at"]).timestamp()
    assert 590 < expires - time.time() <= 600
    assert entry["context_length"] > 0 and entry["details"]["format"] == "gguf"
    unloaded = http.post("/api/chat", json={"model": "fake", "messages": [], "keep_alive": 0, "stream": False})
    assert unloaded.headers["content-type"] == "application/json"
    assert unloaded.json()["done_reason"] == "unload" and unloaded.json()["message"]["content"] == ""
    assert "fake:latest" not in ps(http)


def test_negative_keep_alive_keeps_forever_and_zero_unloads_after_request(http: httpx.Client) -> None:
    http.post("/api/chat", json={"model": "fake", "messages": USER, "keep_alive": -1, "stream": False})
    assert datetime.fromisoformat(ps(http)["fake:latest"]["expires_at"]).year > 2200
    out = http.post("/api/chat", json={"model": "fake", "messages": USER, "keep_alive": 0, "stream": False,
                                       "options": {"num_predict": 2}})
    assert out.json()["done_reason"] == "length"
    assert "fake:latest" not in ps(http)


@pytest.mark.parametrize("forever", ["inf", 1e300, 1e12])
def test_an_endless_keep_alive_is_forever_and_api_ps_still_answers(http: httpx.Client, server: Server,
                                                                   forever: object) -> None:
    http.post("/api/chat", json={"model": "fake", "messages": USER, "keep_alive": forever, "stream": False})
    assert datetime.fromisoformat(ps(http)["fake:latest"]["expires_at"]).year > 2200
    assert "fake:latest" in [m.model for m in ollama.Client(host=server.url).ps().models]  # the client parses it


def test_null_stream_and_raw_mean_their_defaults(http: httpx.Client) -> None:
    streamed = lines(http.post("/api/chat", json={"model": "fake", "messages": USER, "stream": None}))
    assert len(streamed) > 1 and streamed[-1]["done"] is True  # Ollama reads a null stream as true
    r = http.post("/api/generate", json={"model": "fake", "prompt": "hi", "raw": None, "stream": False})
    assert r.status_code == 200 and r.json()["done"] is True, r.text


def test_bad_keep_alive_is_a_400(http: httpx.Client) -> None:
    msg = error_of(http.post("/api/chat", json={"model": "fake", "messages": [], "keep_alive": "soon"}), 400)
    assert "keep_alive" in msg and "5m" in msg


# -- errors ---------------------------------------------------------------------------
def test_unknown_model_is_a_404_naming_what_exists(http: httpx.Client) -> None:
    msg = error_of(http.post("/api/chat", json={"model": "llama3.2", "messages": USER}), 404)
    assert "llama3.2" in msg and "fake:latest" in msg
    assert re.search(r"model ['\"]?llama3.2['\"]? not found", msg), msg  # what auto-pull helpers match
    assert "fake:latest" in error_of(http.post("/api/show", json={"model": "nope"}), 404)


@pytest.mark.parametrize(("body", "words"), [
    ({"messages": USER}, "model"),
    ({"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"model": "fake", "messages": USER, "format": "yaml"}, "format"),
    ({"model": "fake", "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    # a field of several types: the item that is wrong, or the types it takes
    ({"model": "fake", "messages": USER, "options": {"stop": [1, 2]}}, "'options.stop.0': Input should be a valid string"),
    ({"model": "fake", "messages": USER, "keep_alive": [1]}, "'keep_alive': must be a string, a number"),
    ({"model": "fake", "messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": [1]}}]}]},
     "'messages.0.tool_calls.0.function.arguments': must be an object or a string (got list)"),
])
def test_bad_requests_say_what_is_wrong(http: httpx.Client, body: dict[str, Any], words: str) -> None:
    assert words in error_of(http.post("/api/chat", json=body), 400)


def test_ollama_endpoints_hearth_does_not_serve_say_what_to_do(http: httpx.Client) -> None:
    msg = error_of(http.post("/api/create", json={"model": "x", "from": "fake"}), 404)
    assert "not supported" in msg and "hearth models import" in msg
    assert "not supported" in error_of(http.post("/api/push", json={"model": "x"}), 404)
    assert "no route" in error_of(http.post("/api/nothing", json={}), 404)
    assert "did you mean POST /api/chat?" in error_of(http.post("/api/chats", json={}), 404)


def test_invalid_json_body_is_a_400(http: httpx.Client) -> None:
    assert "JSON" in error_of(http.post("/api/chat", content=b"{not json"), 400)


def test_images_for_a_model_that_cannot_see_are_a_400(http: httpx.Client) -> None:
    img = base64.b64encode(b"\x89PNG fake").decode()
    msg = error_of(http.post("/api/chat", json={"model": "fake", "messages": [{**USER[0], "images": [img]}]}), 400)
    assert "cannot see images" in msg
    msg = error_of(http.post("/api/generate", json={"model": "fake", "prompt": "x", "images": ["@@@"]}), 400)
    assert "base64" in msg


def test_error_mid_stream_arrives_as_an_error_line(http: httpx.Client) -> None:
    for path, body in (("/api/chat", {"messages": [{"role": "user", "content": "FAIL_MIDSTREAM"}]}),
                       ("/api/generate", {"prompt": "FAIL_MIDSTREAM"})):
        resp = http.post(path, json={"model": "fake", **body})
        assert resp.status_code == 200
        events = lines(resp)
        assert len(events) == 3 and all(e["done"] is False for e in events[:2])
        validate(events[-1], "ErrorResponse")
        assert "mid-stream" in events[-1]["error"]


# -- embeddings -------------------------------------------------------------------------
def test_embed(http: httpx.Client) -> None:
    body = http.post("/api/embed", json={"model": "fake", "input": ["a house", "a home"]}).json()
    validate(body, "EmbedResponse")
    assert len(body["embeddings"]) == 2 and body["embeddings"][0] != body["embeddings"][1]
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-6) for v in body["embeddings"])
    assert body["prompt_eval_count"] == 4 and body["total_duration"] > 0
    one = http.post("/api/embed", json={"model": "fake", "input": "a house", "dimensions": 16}).json()
    assert one["embeddings"] == body["embeddings"][:1]
    assert http.post("/api/embed", json={"model": "fake", "input": []}).json()["embeddings"] == []
    assert "dimensions" in error_of(http.post("/api/embed", json={"model": "fake", "input": "x", "dimensions": 8}), 400)


def test_legacy_embeddings(http: httpx.Client) -> None:
    new = http.post("/api/embed", json={"model": "fake", "input": "a house"}).json()["embeddings"][0]
    old = http.post("/api/embeddings", json={"model": "fake", "prompt": "a house"}).json()
    assert old == {"embedding": new}


# -- model listing ----------------------------------------------------------------------
def test_tags(http: httpx.Client) -> None:
    body = http.get("/api/tags").json()
    validate(body, "ListResponse")
    entry = {m["name"]: m for m in body["models"]}["fake:latest"]
    assert entry["model"] == "fake:latest"
    assert entry["details"] == {"parent_model": "", "format": "gguf", "family": "fake", "families": ["fake"],
                                "parameter_size": "1", "quantization_level": "F32"}
    datetime.fromisoformat(entry["modified_at"])


def test_show(http: httpx.Client) -> None:
    body = http.post("/api/show", json={"model": "fake"}).json()
    validate(body, "ShowResponse")
    assert body["capabilities"] == ["completion", "embedding"]
    assert body["model_info"]["general.architecture"] == "fake"
    assert body["details"]["family"] == "fake" and "num_ctx" in body["parameters"]
    assert http.post("/api/show", json={"name": "fake:latest"}).json()["details"] == body["details"]
    assert "model" in error_of(http.post("/api/show", json={}), 400)


def test_same_names_through_both_dialects(http: httpx.Client) -> None:
    v1 = {m["id"] for m in http.get("/v1/models").json()["data"]}
    tags = {m["name"] for m in http.get("/api/tags").json()["models"]}
    assert v1 == tags
    for name in ("fake", "fake:latest", "main"):
        ours = http.post("/api/chat", json={"model": name, "messages": USER, "stream": False,
                                            "options": {"num_predict": 3, "seed": 9}}).json()
        theirs = http.post("/v1/chat/completions", json={"model": name, "messages": USER, "max_tokens": 3,
                                                         "seed": 9}).json()
        assert ours["model"] == name
        assert ours["message"]["content"] == theirs["choices"][0]["message"]["content"]
