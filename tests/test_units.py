"""Pure unit tests: settings precedence, OpenAI converters, stop strings, chat fallbacks, GGUF reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from hearth.api.openai import convert
from hearth.api.openai import schemas as w
from hearth.core.errors import BadRequest
from hearth.core.structured import (
    StructuredOutputError,
    check_enforceable,
    validate_output,
)
from hearth.core.types import EmbedResult, Message, ResponseFormat, Usage
from hearth.engines.llamacpp.chat_format import ChatFormatter, fallback_for
from hearth.engines.llamacpp.native_spec import sampler_spec
from hearth.engines.llamacpp.textout import TextOut
from hearth.settings import SettingsError, load_settings

# -- settings -----------------------------------------------------------------


def test_settings_precedence_and_sources(tmp_path: Path) -> None:
    toml = tmp_path / "hearth.toml"
    toml.write_text('port = 9000\nslots = 2\nhost = "127.0.0.2"\n')
    loaded = load_settings(flags={"port": 9100}, config=str(toml),
                           env={"HEARTH_SLOTS": "3", "HEARTH_HOME": str(tmp_path)})
    s = loaded.settings
    assert (s.port, s.slots, s.host) == (9100, 3, "127.0.0.2")
    assert loaded.sources["port"] == "flag"
    assert loaded.sources["slots"] == "env HEARTH_SLOTS"
    assert loaded.sources["host"] == str(toml)
    assert loaded.sources["ctx_per_slot"] == "default"


def test_settings_env_json_and_home(tmp_path: Path) -> None:
    loaded = load_settings(env={"HEARTH_HOME": str(tmp_path / "h"), "HEARTH_ALIASES": '{"x": "y:latest"}'},
                           config=None)
    assert loaded.settings.home == tmp_path / "h"
    assert loaded.settings.aliases == {"x": "y:latest"}
    assert loaded.settings.db_path == tmp_path / "h" / "hearth.db"


@pytest.mark.parametrize(("text", "words"), [
    ("bogus = 1\n", ["unknown setting 'bogus'"]),
    ("port = 'abc'\n", ["port"]),
    ("port = [\n", ["not valid TOML"]),
    ("log_level = 'verbose'\n", ["log_level", "'debug', 'info', 'warning' or 'error'"]),  # was a traceback in serve
])
def test_settings_errors_are_one_line(tmp_path: Path, text: str, words: list[str]) -> None:
    toml = tmp_path / "hearth.toml"
    toml.write_text(text)
    with pytest.raises(SettingsError) as exc:
        load_settings(config=str(toml), env={})
    for word in words:
        assert word in str(exc.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(config=str(tmp_path / "nope.toml"), env={})


def test_hearth_config_command(tmp_path: Path) -> None:
    toml = tmp_path / "hearth.toml"
    toml.write_text("slots = 5\n")
    env = {"HEARTH_HOME": str(tmp_path), "HEARTH_PORT": "12345", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "hearth", "config", "--config", str(toml), "--json"],
                         capture_output=True, text=True, env=env, check=True).stdout
    rows = {r["setting"]: r for r in json.loads(out)["settings"]}
    assert rows["slots"]["value"] == 5 and rows["slots"]["source"] == str(toml)
    assert rows["port"]["value"] == 12345 and rows["port"]["source"] == "env HEARTH_PORT"
    assert all(r["description"] for r in rows.values())
    table = subprocess.run([sys.executable, "-m", "hearth", "config", "--config", str(toml)],
                           capture_output=True, text=True, env=env, check=True).stdout
    assert "SETTING" in table and "env HEARTH_PORT" in table
    bad = subprocess.run([sys.executable, "-m", "hearth", "config", "--config", str(tmp_path / "x.toml")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.startswith("hearth: error:") and "Traceback" not in bad.stderr


# -- OpenAI converters ------------------------------------------------------------


def chat(**kw: object) -> w.ChatCompletionRequest:
    return w.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def test_chat_request_mapping() -> None:
    req = convert.chat_request(chat(
        model="m", temperature=0.3, top_p=0.9, max_tokens=5, max_completion_tokens=7, stop="END", seed=4,
        presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"12": -100}, user="u",
        messages=[{"role": "developer", "content": "sys"},
                  {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]))
    assert req.max_tokens == 7  # max_completion_tokens wins
    assert req.stop == ["END"]
    assert req.messages == [Message("system", "sys"), Message("user", "a\nb")]
    assert req.sampling.logit_bias == {12: -100.0}
    assert req.sampling.seed == 4 and req.user == "u"
    spec = sampler_spec(req)
    assert (spec.temperature, spec.top_p, spec.presence_penalty, spec.frequency_penalty) == (0.3, 0.9, 0.5, 0.25)
    assert spec.grammar is None


def test_response_formats() -> None:
    assert convert.chat_request(chat(response_format={"type": "json_object"})).response_format.type == "json"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    req = convert.chat_request(chat(response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": schema}}))
    assert req.response_format.schema == schema
    assert "root" in (sampler_spec(req).grammar or "")


def test_inline_image_decoded_and_url_refused() -> None:
    req = convert.chat_request(chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]))
    assert req.messages and req.messages[0].images == [b"hello"]
    with pytest.raises(BadRequest, match="does not fetch"):
        convert.chat_request(chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}}]}]))


def test_completion_prompts() -> None:
    assert convert.completion_prompts(w.CompletionRequest(prompt="a")) == ["a"]
    assert convert.completion_prompts(w.CompletionRequest(prompt=["a", "b"])) == ["a", "b"]
    with pytest.raises(BadRequest):
        convert.completion_prompts(w.CompletionRequest(prompt=[[1, 2]]))
    assert convert.completion_request(w.CompletionRequest(prompt="a"), "a").max_tokens == 16


def test_embed_response_base64_roundtrip() -> None:
    import base64
    import struct

    body = convert.embed_response(EmbedResult([[0.5, -0.25]], 3, "m"), "base64")
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert struct.unpack("<2f", raw) == (0.5, -0.25)
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_usage_body() -> None:
    u = convert.usage_body(Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=2))
    assert u["total_tokens"] == 7 and u["prompt_tokens_details"]["cached_tokens"] == 2


# -- structured output ------------------------------------------------------------


@pytest.mark.parametrize("keyword", ["multipleOf", "minimum", "not", "if", "patternProperties", "uniqueItems"])
def test_unenforceable_keywords_named(keyword: str) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer", keyword: 2}}}
    with pytest.raises(BadRequest, match=keyword):
        check_enforceable(schema)


def test_enforceable_schema_passes() -> None:
    check_enforceable({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
        "when": {"type": "string", "format": "date"}}, "required": ["name"], "additionalProperties": False})


def test_validate_output() -> None:
    fmt = ResponseFormat(type="json_schema", schema={"type": "object", "required": ["a"]})
    validate_output('{"a": 1}', fmt, "stop")
    with pytest.raises(StructuredOutputError, match="finish_reason=length"):
        validate_output('{"a": ', fmt, "length")
    with pytest.raises(StructuredOutputError, match="'a' is a required"):
        validate_output("{}", fmt, "stop")
    with pytest.raises(StructuredOutputError, match="not valid JSON"):
        validate_output("nope", ResponseFormat(type="json"), "stop")


# -- stop strings and UTF-8 -------------------------------------------------------


def feed(out: TextOut, pieces: list[bytes]) -> str:
    return "".join(out.push(p) for p in pieces) + out.flush()


def test_stop_across_tokens_never_emitted() -> None:
    out = TextOut(["STOP"])
    assert feed(out, [b"hello S", b"T", b"OP and more"]) == "hello "
    assert out.stopped


def test_held_back_prefix_released_when_ruled_out() -> None:
    out = TextOut(["STOP"])
    assert out.push(b"a ST") == "a "
    assert out.push(b"ART") == "START"
    assert not out.stopped


def test_split_utf8_characters() -> None:
    data = "héllo 🙂".encode()
    out = TextOut([])
    assert feed(out, [data[i:i + 1] for i in range(len(data))]) == "héllo 🙂"


def test_earliest_of_several_stops() -> None:
    assert feed(TextOut(["xyz", "b"]), [b"abcxyz"]) == "a"


# -- chat templates -----------------------------------------------------------------


def test_gemma_fallback() -> None:
    f = ChatFormatter(None, "gemma3", "<bos>", "<eos>")
    text = f.render([Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"),
                     Message("user", "Bye")])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello"
                    "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert f.description == "fallback:gemma"
    assert fallback_for("llama") == "llama3" and fallback_for("qwen2") == "chatml"


def test_gguf_template_used_and_errors_are_400() -> None:
    tpl = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
           "{% if add_generation_prompt %}[assistant]{% endif %}")
    f = ChatFormatter(tpl, "qwen2", "<s>", "</s>")
    assert f.render([Message("user", "x")]) == "<s>[user]x[assistant]"
    bad = ChatFormatter("{{ raise_exception('no system role') }}", "x", "", "")
    with pytest.raises(BadRequest, match="no system role"):
        bad.render([Message("system", "x")])


# -- GGUF metadata --------------------------------------------------------------------


def test_gguf_reader_on_written_file(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    from hearth.models.gguf_meta import read_gguf

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_file_type(15)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(1000)])
    writer.add_tensor("w", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_gguf(path)
    assert (info.architecture, info.context_length, info.embedding_length) == ("llama", 2048, 64)
    assert info.quantization == "Q4_K_M" and info.parameter_count == 32
    assert info.array_lengths["tokenizer.ggml.tokens"] == 1000


def test_tool_results_are_matched_to_their_calls() -> None:
    from hearth.core.tools import answered_calls
    from hearth.core.types import Message, ToolCall

    a, b, c = ToolCall("get_weather", id="A"), ToolCall("get_time", id="B"), ToolCall("get_weather", id="C")
    msgs = [Message("user", "q"), Message("assistant", "", tool_calls=[a, b, c]),
            Message("tool", "t", tool_call_id="C"),  # by id
            Message("tool", "w", name="get_weather"),  # by name: the first open get_weather
            Message("tool", "x"),  # neither: the call still open
            Message("tool", "y"),  # nothing open any more
            Message("assistant", "", tool_calls=[ToolCall("f", id="D")]), Message("tool", "z", name="other")]
    got = answered_calls(msgs)
    assert {i: call.id for i, call in got.items()} == {2: "C", 3: "A", 4: "B", 7: "D"}


def test_tool_definitions_and_choice_are_checked() -> None:
    from hearth.core.errors import BadRequest
    from hearth.core.tools import check_tool_choice, check_tools

    tools = check_tools([{"function": {"name": "a.b-c_1", "parameters": {"type": "object"}}}])
    assert tools == [{"type": "function", "function": {"name": "a.b-c_1", "parameters": {"type": "object"}}}]
    assert check_tool_choice({"function": {"name": "a.b-c_1"}}, tools) == {
        "type": "function", "function": {"name": "a.b-c_1"}}
    assert check_tool_choice("none", []) == "none" and check_tool_choice(None, []) is None
    for bad in ([{"type": "function", "function": {"name": "has space"}}],
                [{"type": "function", "function": {"name": "f", "parameters": "x"}}], ["f"]):
        with pytest.raises(BadRequest):
            check_tools(bad)


def test_openai_tool_turns_become_core_messages() -> None:
    req = convert.chat_request(w.ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "q", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": [{"type": "text", "text": "42"}]},
    ]}))
    user, asst, tool = req.messages or []
    assert user.name == "ann" and asst.content == "" and tool.content == "42"  # a participant, not a function
    assert [(c.id, c.name, c.arguments) for c in asst.tool_calls] == [("c1", "f", '{"a": 1}')]
    assert (tool.role, tool.tool_call_id, tool.name) == ("tool", "c1", "f")


def test_cli_output_into_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "hearth.toml").write_text("")
    env = {**os.environ, "HEARTH_HOME": str(tmp_path), "HEARTH_CONFIG": str(tmp_path / "hearth.toml")}
    proc = subprocess.Popen([sys.executable, "-m", "hearth", "config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `hearth config | head -0`: the reader is gone before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 0 and "Traceback" not in err, err


@pytest.mark.parametrize(("delta", "finish", "logprobs"), [
    ({"role": "assistant", "content": "", "refusal": None}, None, None),
    ({"content": "héllo \"quoted\"\n"}, None, {"content": [{"token": "h", "logprob": -0.5, "bytes": [104]}]}),
    ({}, "length", None),
    ({}, "cancelled", None),  # mapped as the full chunk maps it
    ({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                      "function": {"name": "f", "arguments": "{}"}}]}, None, None),
])
def test_chat_chunk_events_are_the_bytes_of_the_whole_chunk(delta: dict, finish: str | None,
                                                          logprobs: dict | None) -> None:
    events = convert.ChatChunks("chatcmpl-abc", 1764547200, "mödel:latest")
    got = events.event(2, delta, finish, logprobs)
    whole = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1764547200, "model": "mödel:latest",
             "system_fingerprint": "hearth",
             "choices": [{"index": 2, "delta": delta, "logprobs": logprobs,
                          "finish_reason": convert.FINISH.get(finish, "stop") if finish else None}]}
    assert got.startswith(b"data: ") and got.endswith(b"\n\n")
    assert json.loads(got[6:]) == whole
    assert got == b"data: " + orjson.dumps(whole) + b"\n\n"


def _scan_reference(headers: list[tuple[bytes, bytes]]) -> tuple[int, str | None]:
    """The rule, spelled out: total size; the first header (in order) that carries a key."""
    secret = None
    for name, value in headers:
        if secret is None and name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                secret = token.strip()
        elif secret is None and name == b"x-api-key" and value.strip():
            secret = value.decode("latin-1").strip()
    return sum(len(n) + len(v) for n, v in headers), secret


@pytest.mark.parametrize("keys", [
    [],
    [(b"authorization", b"Bearer hk-abc")],
    [(b"authorization", b"bearer   hk-abc  ")],
    [(b"authorization", b"Basic dXNlcg==")],
    [(b"authorization", b"Bearer ")],
    [(b"x-api-key", b" hk-xyz ")],
    [(b"x-api-key", b"  ")],
    [(b"x-api-key", b"hk-first"), (b"authorization", b"Bearer hk-second")],
    [(b"authorization", b"Basic x"), (b"authorization", b"Bearer hk-later")],
    [(b"authorization", b"Bearer hk-one"), (b"authorization", b"Bearer hk-two")],
    [(b"authorization", b"Basic x"), (b"x-api-key", b"hk-key")],
])
def test_scan_headers_finds_the_first_key_and_the_size(keys: list[tuple[bytes, bytes]]) -> None:
    from hearth.api.auth import scan_headers

    headers = [(b"host", b"127.0.0.1:8000"), *keys, (b"content-type", b"application/json"),
               (b"content-length", b"42")]
    assert scan_headers(headers) == _scan_reference(headers)


@pytest.mark.parametrize(("seconds", "text"), [
    (30, "less than a minute from now"), (61, "1 minute from now"), (299, "4 minutes from now"),
    (7300, "2 hours from now"), (3 * 86400, "3 days from now"), (20 * 86400, "2 weeks from now"),
    (1000 * 86400, "2 years from now"), (-5, "expired"),
])
def test_hearth_ps_says_when_a_model_is_unloaded_in_the_largest_fitting_unit(seconds: int, text: str) -> None:
    import datetime as dt

    from hearth.cli.ps import until
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds + 0.5)
    assert until(when.isoformat()) == text
    assert until(None) == "Forever"


def test_fields_refused_with_a_reason_are_not_logged_as_ignored() -> None:
    wire = w.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                   "modalities": ["text"], "vendor_extra": 1})
    assert wire.unknown_fields() == ["vendor_extra"]  # modalities is read (and refused unless text)
