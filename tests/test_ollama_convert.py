"""Unit tests of the Ollama dialect's pure converters (no server, no model)."""

from __future__ import annotations

import asyncio
import base64
import logging
from datetime import datetime

import pytest

from hearth.api.common import parse
from hearth.api.ollama import convert
from hearth.api.ollama import schemas as w
from hearth.api.ollama.template import render_template
from hearth.core.errors import BadRequest
from hearth.core.types import EmbedResult, LoadedModel, ModelInfo, Usage
from hearth.engines.fake import FakeEngine

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake image bytes").decode()


def chat(**body: object) -> w.ChatRequest:
    return parse(w.ChatRequest, {"model": "m", **body})


def gen(**body: object) -> w.GenerateRequest:
    return parse(w.GenerateRequest, {"model": "m", **body})


# -- keep_alive --------------------------------------------------------------------
@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), ("", None), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25), ("1.5h", 5400.0),
    ("30s", 30.0), ("0", 0.0), (0, 0.0), (45, 45.0), (2.5, 2.5), ("300", 300.0),
    (-1, -1.0), ("-5m", -1.0), ("-1", -1.0), (-0.5, -1.0),
])
def test_keep_alive_durations(value: w.KeepAlive, seconds: float | None) -> None:
    assert convert.parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["abc", "5x", "m5", "5m3", "1h 30m", "--5m", True])
def test_keep_alive_rejects_non_durations(value: w.KeepAlive) -> None:
    with pytest.raises(BadRequest) as exc:
        convert.parse_keep_alive(value)
    assert exc.value.status == 400
    assert "5m" in exc.value.message and repr(value) in exc.value.message


# -- chat --------------------------------------------------------------------------
def test_chat_history_with_system_prompt_keeps_roles_and_order() -> None:
    req = convert.chat_request(chat(messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a color."},
    ]))
    assert req.is_chat and req.prompt is None
    assert [(m.role, m.content) for m in req.messages or []] == [
        ("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Name a color."),
    ]
    assert all(m.images == [] for m in req.messages or [])
    assert req.response_format.type == "text"
    assert not convert.is_load_request(req)


def test_chat_without_messages_is_a_load_request() -> None:
    assert convert.is_load_request(convert.chat_request(chat()))
    req = convert.chat_request(chat(messages=[], keep_alive=0))
    assert convert.is_load_request(req) and req.keep_alive == 0


def test_options_map_onto_sampling_limits_and_stops() -> None:
    req = convert.chat_request(chat(messages=[{"role": "user", "content": "x"}], options={
        "num_ctx": 1024, "num_predict": 64, "temperature": 0.3, "top_k": 20, "top_p": 0.9, "min_p": 0.1,
        "seed": 7, "stop": ["\n\n", ""], "repeat_penalty": 1.1, "repeat_last_n": 32,
        "presence_penalty": 0.5, "frequency_penalty": 0.25,
    }))
    s = req.sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.seed) == (0.3, 20, 0.9, 0.1, 7)
    assert (s.repeat_penalty, s.repeat_last_n, s.presence_penalty, s.frequency_penalty) == (1.1, 32, 0.5, 0.25)
    assert req.max_tokens is None and req.max_tokens_cap == 64  # a ceiling (Ollama), not a reservation
    assert req.num_ctx == 1024 and req.stop == ["\n\n"]


def test_single_stop_string_and_unlimited_num_predict() -> None:
    req = convert.chat_request(chat(messages=[], options={"stop": "END", "num_predict": -1}))
    assert req.stop == ["END"] and req.max_tokens is None and req.max_tokens_cap is None
    assert convert.chat_request(chat(messages=[], options={"num_predict": -2})).max_tokens_cap is None


def test_zero_num_predict_is_refused() -> None:
    with pytest.raises(BadRequest, match="num_predict must be positive"):
        convert.chat_request(chat(messages=[], options={"num_predict": 0}))


def test_unknown_options_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="hearth.ollama"):
        req = convert.chat_request(chat(messages=[], options={"mirostat": 2, "num_thread": 4, "seed": 1}))
    assert req.sampling.seed == 1
    assert "mirostat" in caplog.text and "num_thread" in caplog.text


def test_badly_typed_option_names_the_field() -> None:
    with pytest.raises(BadRequest) as exc:
        parse(w.ChatRequest, {"model": "m", "messages": [], "options": {"temperature": "hot"}})
    assert "options.temperature" in exc.value.message


@pytest.mark.parametrize(("fmt", "kind"), [(None, "text"), ("", "text"), ("json", "json")])
def test_format_strings(fmt: str | None, kind: str) -> None:
    assert convert.chat_request(chat(messages=[], format=fmt)).response_format.type == kind


def test_format_schema_becomes_json_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    rf = convert.chat_request(chat(messages=[], format=schema)).response_format
    assert rf.type == "json_schema" and rf.schema == schema and rf.strict


def test_unknown_format_string_is_a_400() -> None:
    with pytest.raises(BadRequest, match='"json" or a JSON schema'):
        convert.chat_request(chat(messages=[], format="xml"))


def test_images_are_decoded_from_base64() -> None:
    req = convert.chat_request(chat(messages=[{"role": "user", "content": "what is this?", "images": [PNG]}]))
    assert req.messages and req.messages[0].images == [base64.b64decode(PNG)]
    data_url = convert.decode_images([f"data:image/png;base64,{PNG}"], "images")
    assert data_url == [base64.b64decode(PNG)]


def test_invalid_base64_image_is_a_400_naming_the_image() -> None:
    with pytest.raises(BadRequest) as exc:
        convert.chat_request(chat(messages=[{"role": "user", "content": "x", "images": [PNG, "not base64!"]}]))
    assert exc.value.status == 400
    assert "messages[0].images[1]" in exc.value.message and "base64" in exc.value.message


def test_images_are_refused_with_a_400_when_the_model_cannot_see() -> None:
    req = convert.chat_request(chat(messages=[{"role": "user", "content": "x", "images": [PNG]}]))
    engine = FakeEngine()
    info = asyncio.run(engine.list_models())[0]
    with pytest.raises(BadRequest) as exc:
        asyncio.run(engine.generate(info, req))
    assert exc.value.status == 400 and "cannot see images" in exc.value.message


@pytest.mark.parametrize(("body", "words"), [
    ({"think": "lots"}, "think must be true, false or one of"),
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
])
def test_unsupported_features_are_refused(body: dict[str, object], words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        convert.chat_request(chat(messages=[{"role": "user", "content": "x"}], **body))


def test_think_false_is_fine() -> None:
    assert convert.chat_request(chat(messages=[], think=False)).messages == []


def test_tools_and_tool_calls_in_history_become_core_types() -> None:
    req = convert.chat_request(chat(messages=[
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "42", "tool_name": "f"},
    ], tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]))
    assert req.tools == [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    (call,) = req.messages[1].tool_calls
    assert (call.name, call.arguments) == ("f", '{"a":1}') and call.id.startswith("call_")
    assert (req.messages[2].role, req.messages[2].name) == ("tool", "f")
    with pytest.raises(BadRequest, match=r"tools\[0\]"):
        convert.chat_request(chat(messages=[], tools=[{"type": "function", "function": {}}]))


# -- generate ----------------------------------------------------------------------
def test_generate_with_system_becomes_a_chat() -> None:
    req = convert.generate_request(gen(prompt="Why is the sky blue?", system="Be brief.", images=[PNG]))
    assert req.prompt is None and req.messages is not None
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be brief."), ("user", "Why is the sky blue?")]
    assert req.messages[1].images == [base64.b64decode(PNG)]


def test_generate_raw_sends_the_prompt_untouched() -> None:
    req = convert.generate_request(gen(prompt="<start>user\nhi<end>\n", raw=True, options={"seed": 3}))
    assert req.messages is None and req.prompt == "<start>user\nhi<end>\n" and req.sampling.seed == 3


@pytest.mark.parametrize("extra", [{"system": "s"}, {"template": "{{ .Prompt }}"}, {"images": [PNG]}])
def test_generate_raw_refuses_what_it_would_ignore(extra: dict[str, object]) -> None:
    with pytest.raises(BadRequest, match="raw"):
        convert.generate_request(gen(prompt="p", raw=True, **extra))


def test_generate_suffix_and_context_are_refused_clearly() -> None:
    with pytest.raises(BadRequest, match="suffix"):
        convert.generate_request(gen(prompt="def f():", suffix="    return x"))
    with pytest.raises(BadRequest, match="/api/chat"):
        convert.generate_request(gen(prompt="p", context=[1, 2, 3]))
    assert convert.generate_request(gen(prompt="p", context=[])).messages is not None


def test_generate_template_renders_into_a_raw_prompt() -> None:
    req = convert.generate_request(gen(prompt="hi", system="S", template="{{ .System }}\nUSER: {{ .Prompt }}\nA:"))
    assert req.messages is None and req.prompt == "S\nUSER: hi\nA:"


def test_generate_empty_prompt_is_a_load_request_even_with_a_template() -> None:
    req = convert.generate_request(gen(template="X {{ .Prompt }}", keep_alive="10m"))
    assert convert.is_load_request(req) and req.keep_alive == 600.0
    assert convert.is_load_request(convert.generate_request(gen(prompt="")))
    assert not convert.is_load_request(convert.generate_request(gen(prompt="hi")))


# -- template subset ---------------------------------------------------------------
def test_template_conditionals_trim_markers_and_response_cut() -> None:
    tpl = ("{{ if .System }}<sys>{{ .System }}</sys>\n{{ end }}"
           "{{- if .Prompt }}<u>{{ .Prompt }}</u>{{ else }}<empty>{{ end }}\n<a>{{ .Response }}</a>")
    assert render_template(tpl, system="S", prompt="P") == "<sys>S</sys>\n<u>P</u>\n<a>"
    assert render_template(tpl, system="", prompt="") == "<empty>\n<a>"
    assert render_template("{{/* note */}}A  {{- .Prompt -}}  B", system="", prompt="p") == "ApB"


@pytest.mark.parametrize(("tpl", "words"), [
    ("{{ range .Messages }}{{ .Content }}{{ end }}", "range .Messages"),
    ("{{ .Tools }}", ".Tools"),
    ("{{ if .System }}x", "unclosed"),
    ("{{ .Prompt | upper }}", "upper"),
])
def test_template_outside_the_subset_is_a_400_with_the_fix(tpl: str, words: str) -> None:
    with pytest.raises(BadRequest) as exc:
        render_template(tpl, system="", prompt="p")
    assert words in exc.value.message and exc.value.status == 400


# -- embeddings --------------------------------------------------------------------
def test_embed_request_inputs_truncate_dimensions() -> None:
    req = convert.embed_request(parse(w.EmbedRequest, {"model": "m", "input": "hello", "dimensions": 8}))
    assert req.inputs == ["hello"] and req.truncate is True and req.dimensions == 8
    req = convert.embed_request(parse(w.EmbedRequest, {"model": "m", "input": ["a", "b"], "truncate": False,
                                                       "keep_alive": "1m"}))
    assert req.inputs == ["a", "b"] and req.truncate is False and req.keep_alive == 60.0
    assert convert.embed_request(parse(w.EmbedRequest, {"model": "m", "input": ""})).inputs == []
    legacy = convert.embeddings_request(parse(w.EmbeddingsRequest, {"model": "m", "prompt": "x"}))
    assert legacy.inputs == ["x"]


def test_embed_bodies() -> None:
    result = EmbedResult(vectors=[[0.6, 0.8]], prompt_tokens=3, model="m", total_ns=50, load_ns=7)
    body = convert.embed_body("m", result, 10)
    assert body == {"model": "m", "embeddings": [[0.6, 0.8]], "total_duration": 50, "load_duration": 7,
                    "prompt_eval_count": 3}
    assert convert.embed_body("m", None, 10)["embeddings"] == []
    assert convert.embeddings_body(result) == {"embedding": [0.6, 0.8]}
    assert convert.embeddings_body(None) == {"embedding": []}


# -- response bodies ---------------------------------------------------------------
def test_final_body_carries_counts_and_nanosecond_timings() -> None:
    usage = Usage(prompt_tokens=11, completion_tokens=5, load_ns=3, prompt_ns=400, generate_ns=900, total_ns=1500)
    body = convert.final_body("chat", "m:latest", "t", "hello", "length", usage, total_ns=2000)
    assert body["message"] == {"role": "assistant", "content": "hello"}
    assert body["done"] is True and body["done_reason"] == "length"
    assert (body["total_duration"], body["load_duration"], body["prompt_eval_count"]) == (2000, 3, 11)
    assert (body["prompt_eval_duration"], body["eval_count"], body["eval_duration"]) == (400, 5, 900)
    # the engine's own total wins when it is longer than the route's measurement
    assert convert.final_body("generate", "m", "t", "", "stop", usage, 10)["total_duration"] == 1500
    assert convert.final_body("generate", "m", "t", "x", "cancelled", usage, 10)["done_reason"] == "stop"


def test_chunk_and_load_bodies() -> None:
    assert convert.chunk_body("generate", "m", "t", "tok") == {"model": "m", "created_at": "t", "response": "tok",
                                                               "done": False}
    body = convert.load_body("chat", "m", "t", "unload", 0, 99)
    assert body["done"] is True and body["done_reason"] == "unload" and body["message"]["content"] == ""


def test_rfc3339_is_utc_and_parseable() -> None:
    text = convert.rfc3339(1700000000.25)
    assert text == "2023-11-14T22:13:20.250000Z"
    assert datetime.fromisoformat(text).timestamp() == 1700000000.25


def model(**kw: object) -> ModelInfo:
    base = dict(id="gemma3-270m:latest", engine="local", context_length=4096, architecture="gemma3",
                family="gemma3", parameter_count=268_098_176, quantization="Q4_K_M", size_bytes=253_000_000,
                path="/models/gemma3.gguf", created=1700000000, capabilities=["completion", "embedding"],
                chat_template="{{ messages }}",
                metadata={"general.architecture": "gemma3", "gemma3.context_length": 32768,
                          "size_label": "270M", "context_length_train": 32768, "blob": b"\x00"})
    base.update(kw)
    return ModelInfo(**base)  # type: ignore[arg-type]


def test_details_read_from_model_info() -> None:
    d = convert.details(model())
    assert d == {"parent_model": "", "format": "gguf", "family": "gemma3", "families": ["gemma3"],
                 "parameter_size": "270M", "quantization_level": "Q4_K_M"}
    assert convert.parameter_size(model(metadata={}, parameter_count=7_615_616_512)) == "7.6B"
    assert convert.parameter_size(model(metadata={}, parameter_count=0)) == ""


def test_show_body_has_gguf_model_info_template_and_capabilities() -> None:
    body = convert.show_body(model())
    assert body["model_info"] == {"general.architecture": "gemma3", "gemma3.context_length": 32768,
                                  "general.parameter_count": 268_098_176}
    assert body["template"] == "{{ messages }}" and body["capabilities"] == ["completion", "embedding"]
    assert "num_ctx" in body["parameters"] and "4096" in body["parameters"]
    assert body["details"]["quantization_level"] == "Q4_K_M"


def test_ps_body_expiry() -> None:
    info = model()
    now = 1700000000.0
    soon = convert.ps_body(LoadedModel(info.id, 100, 4096, now + 300), info, now)
    assert soon["expires_at"] == convert.rfc3339(now + 300) and soon["context_length"] == 4096
    forever = convert.ps_body(LoadedModel(info.id, 100, 4096, None), info, now)
    assert datetime.fromisoformat(forever["expires_at"]).year > 2200
    assert soon["size"] == 100 and soon["details"]["family"] == "gemma3"
