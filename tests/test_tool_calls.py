"""In-box tool calling without the model: prompts, grammar, parsing calls, holding back streamed text.

The real model is in tests/test_tools_real.py; these pin down the edges fast.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from hearth.core.errors import BadRequest
from hearth.core.structured import StructuredOutputError
from hearth.core.types import (
    Chunk,
    GenerateRequest,
    Message,
    TokenLogprob,
    ToolCall,
    Usage,
)
from hearth.engines.llamacpp import tool_calls
from hearth.engines.llamacpp.chat_format import ChatFormatter
from hearth.engines.llamacpp.tool_stream import ToolCallGeneration

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
NAMES = {"get_weather", "add"}
HISTORY = [
    Message(role="system", content="Be brief."),
    Message(role="user", content="Weather in Paris and Rome?"),
    Message(role="assistant", content="Checking.", tool_calls=[
        ToolCall(name="get_weather", arguments='{"city": "Paris"}', id="c1"),
        ToolCall(name="get_weather", arguments='{"city": "Rome"}', id="c2")]),
    Message(role="tool", content="18 C", tool_call_id="c1"),
    Message(role="tool", content="21 C", tool_call_id="c2"),
]
# A Qwen 2.5-like template: it renders tools, calls and results itself.
QWEN_LIKE = """{%- if tools %}<|im_start|>system
<tools>
{%- for tool in tools %}
{{ tool.function.name }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>{{ tc.function.name }}:{{ tc.function.arguments.city }}:{{ tc.id }}</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.tool_call_id }}={{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


# -- parsing ------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',  # closed by the stop string
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',  # Mistral
    '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>',  # arguments as text
])
def test_parse_call_formats(text: str) -> None:
    parsed = tool_calls.parse(text, NAMES)
    assert parsed is not None
    before, calls = parsed
    assert before == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")


def test_parse_several_calls_and_text_before() -> None:
    text = ('Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    before, calls = tool_calls.parse(text, NAMES) or ("", [])
    assert before == "Let me look."
    assert [c.name for c in calls] == ["get_weather", "add"]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("text", [
    "Paris is sunny today.",
    '{"city": "Paris"}',  # JSON, but no call
    '{"name": "unknown_fn", "arguments": {}}',  # not one of the tools
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Par',  # cut off
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call> and then some prose',
    '<tool_call>{"name": "get_weather", "arguments": [1, 2]}</tool_call>',
])
def test_parse_refuses_what_is_not_a_clean_call(text: str) -> None:
    assert tool_calls.parse(text, NAMES) is None


def test_held_back_is_a_possible_marker_start() -> None:
    assert tool_calls.held_back("Sure <tool") == len("<tool")
    assert tool_calls.held_back("Sure [TOOL_") == len("[TOOL_")
    assert tool_calls.held_back("Sure <b>") == 0
    assert tool_calls.held_back("x <") == 1


# -- prompts ------------------------------------------------------------------------


def test_plain_messages_write_tools_calls_and_results_as_text() -> None:
    out = tool_calls.plain_messages(HISTORY, [WEATHER])
    assert [m.role for m in out] == ["system", "user", "assistant", "user"]
    assert out[0].content.startswith("Be brief.\n\n") and '"name": "get_weather"' in out[0].content
    assert out[2].content.startswith("Checking.\n<tool_call>")
    assert [json.loads(line)["arguments"]["city"] for line in out[2].content.splitlines() if line.startswith("{")] \
        == ["Paris", "Rome"]
    assert out[3].content.count("<tool_response>") == 2 and "18 C" in out[3].content and "21 C" in out[3].content
    assert all(not m.tool_calls for m in out)


def test_fallback_formats_render_tool_histories() -> None:
    for arch in ("gemma3", "llama", "qwen2"):
        prompt = ChatFormatter(None, arch, "<bos>", "<eos>").render(HISTORY, [WEATHER])
        assert "<tool_response>\n18 C\n</tool_response>" in prompt
        assert '"arguments": {"city": "Rome"}' in prompt
        assert '"description": "Weather for a city"' in prompt


def test_template_without_tools_gets_them_as_text() -> None:
    plain = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    f = ChatFormatter(plain, "qwen2", "", "")
    assert not f.knows_tools
    prompt = f.render(HISTORY, [WEATHER])
    assert "[tool]" not in prompt and "[user] <tool_response>" in prompt and "get_weather" in prompt


def test_template_with_tools_renders_them_itself() -> None:
    f = ChatFormatter(QWEN_LIKE, "qwen2", "", "")
    assert f.knows_tools
    prompt = f.render(HISTORY, [WEATHER, ADD])
    assert "<tools>get_weatheradd</tools>" in prompt
    assert "<tool_call>get_weather:Paris:c1</tool_call>" in prompt  # arguments reach it as an object
    assert "<tool_response>c2=21 C</tool_response>" in prompt
    assert "You can call functions" not in prompt  # hearth's own tool prompt stays out


# -- grammar ------------------------------------------------------------------------


def _req(choice: object, parallel: bool | None = None) -> GenerateRequest:
    return GenerateRequest(model="m", messages=[Message(role="user", content="hi")], tools=[WEATHER, ADD],
                           tool_choice=choice, parallel_tool_calls=parallel)  # type: ignore[arg-type]


def test_grammar_forces_one_call_to_the_named_function() -> None:
    g = tool_calls.grammar(_req({"type": "function", "function": {"name": "add"}}))
    assert "root ::= hearth-call\n" in g
    assert '"\\"add\\""' in g and "get_weather" not in g
    assert g.count("root ::=") == 1


def test_grammar_required_offers_every_tool_and_parallel_only_when_asked() -> None:
    one = tool_calls.grammar(_req("required"))
    assert "get_weather" in one and '"\\"add\\""' in one and "root ::= hearth-call\n" in one
    many = tool_calls.grammar(_req("required", parallel=True))
    assert 'root ::= hearth-call ("\\n" hearth-call){0,%d}' % (tool_calls.MAX_CALLS - 1) in many  # bounded
    assert tool_calls.forced(_req("required")) and not tool_calls.forced(_req("auto"))
    assert not tool_calls.forced(_req("none")) and tool_calls.active_tools(_req("none")) == []


def test_auto_gets_a_lazy_grammar_that_falls_back_to_none_unless_strict() -> None:
    g, triggers = tool_calls.sampling_grammar(_req("auto"))
    assert triggers == [tool_calls.TRIGGER] and g and "[ \\t\\n]*" in g  # the model lays the call out freely
    assert tool_calls.sampling_grammar(_req("required"))[1] is None  # forced: from the first token
    import re
    m = re.fullmatch(tool_calls.TRIGGER, 'Sure, let me look.\n<tool_call>\n{"name": "add"')
    assert m and m.group(1).startswith("<tool_call>")
    assert re.fullmatch(tool_calls.TRIGGER, "no call here") is None
    recursive = {"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object", "properties": {"child": {"$ref": "#"}}}}}
    req = GenerateRequest(model="m", messages=[], tools=[recursive], tool_choice="auto")
    assert tool_calls.sampling_grammar(req) == (None, None)  # unconstrained, still parsed
    req.tools = [{**recursive, "function": {**recursive["function"], "strict": True}}]
    with pytest.raises(BadRequest):
        tool_calls.sampling_grammar(req)


def test_strict_function_fails_closed_on_keywords_the_grammar_cannot_enforce() -> None:
    email = {"type": "object", "properties": {"to": {"type": "string", "format": "email"}}, "required": ["to"]}
    loose = {"type": "function", "function": {"name": "mail", "parameters": email}}
    req = GenerateRequest(model="m", messages=[], tools=[loose], tool_choice="required")
    assert "hearth-call" in tool_calls.grammar(req)  # best effort without strict
    req.tools = [{"type": "function", "function": {"name": "mail", "parameters": email, "strict": True}}]
    with pytest.raises(BadRequest, match="function 'mail' is strict, but JSON schema format 'email'") as err:
        tool_calls.grammar(req)
    assert err.value.param == "tools"


# -- streaming ----------------------------------------------------------------------


class Scripted:
    """An inner generation that yields the given text pieces, then a finish."""

    def __init__(self, pieces: list[str], finish: str = "stop") -> None:
        self.pieces = pieces
        self.finish = finish
        self.prompt_tokens = 7
        self.closed = False

    async def _run(self) -> AsyncIterator[Chunk]:
        for p in self.pieces:
            yield Chunk(text=p)
        yield Chunk(finish_reason=self.finish, usage=Usage(prompt_tokens=7, completion_tokens=len(self.pieces)))  # type: ignore[arg-type]

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._run()

    async def aclose(self) -> None:
        self.closed = True


def _drain(gen: ToolCallGeneration) -> list[Chunk]:
    async def run() -> list[Chunk]:
        return [c async for c in gen]
    return asyncio.run(run())


def test_stream_sends_text_before_a_call_and_then_the_call() -> None:
    pieces = ["Let me ", "check. <", "tool_", 'call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}']
    out = _drain(ToolCallGeneration(Scripted(pieces), NAMES, forced=False))
    text = "".join(c.text for c in out)
    assert text == "Let me check. "  # text before the marker streams as it came
    assert "<" not in "".join(c.text for c in out[:2])  # the marker's start was held back, never sent
    calls = [c for ch in out for c in ch.tool_calls]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert out[-1].finish_reason == "tool_calls" and out[-1].usage is not None
    assert out[-1].usage.completion_tokens == len(pieces)


def test_stream_plain_answer_loses_nothing() -> None:
    pieces = ["  ", "{not a call", "} and <b>bold</b> and <tool", " done"]
    out = _drain(ToolCallGeneration(Scripted(pieces, "length"), NAMES, forced=False))
    assert "".join(c.text for c in out) == "".join(pieces)
    assert out[-1].finish_reason == "length" and not any(c.tool_calls for c in out)


def test_stream_json_call_at_start_is_a_call() -> None:
    out = _drain(ToolCallGeneration(Scripted(["\n", '{"name": "add", "parameters": {"a": 2, "b": 3}}']), NAMES, False))
    assert [c.name for ch in out for c in ch.tool_calls] == ["add"] and not "".join(c.text for c in out).strip()


def test_forced_call_cut_off_is_an_error_not_text() -> None:
    gen = ToolCallGeneration(Scripted(['<tool_call>\n{"name": "add", "argu'], "length"), NAMES, forced=True)
    with pytest.raises(StructuredOutputError, match="max_tokens"):
        _drain(gen)


def test_logprobs_travel_with_the_text_or_call_they_belong_to() -> None:
    def lp(t: str) -> TokenLogprob:
        return TokenLogprob(t, -0.5, list(t.encode()))

    class WithLogprobs(Scripted):
        async def _run(self) -> AsyncIterator[Chunk]:
            for p in self.pieces:
                yield Chunk(text=p, logprobs=(lp(p),))
            yield Chunk(finish_reason="stop", usage=Usage())

    pieces = ["Ok <", "tool_call>", '{"name": "add", "arguments": {"a": 1, "b": 2}}']
    out = _drain(ToolCallGeneration(WithLogprobs(pieces), NAMES, forced=False))
    assert [t.token for c in out for t in c.logprobs] == pieces  # none lost, none twice
    assert [t.token for t in out[0].logprobs] == ["Ok <"] and out[0].text == "Ok "
    assert [t.token for c in out if c.tool_calls for t in c.logprobs] == pieces[1:]


def test_aclose_reaches_the_inner_generation() -> None:
    inner = Scripted(["x"])
    asyncio.run(ToolCallGeneration(inner, NAMES, forced=False).aclose())
    assert inner.closed


NULLABLE_UNIT = {"type": "object", "properties": {
    "city": {"type": "string"},
    "unit": {"type": ["string", "null"], "enum": ["celsius", "fahrenheit", None]}},
    "required": ["city", "unit"], "additionalProperties": False}


def test_a_type_list_keeps_the_keywords_beside_it_in_the_grammar() -> None:
    """OpenAI's strict mode writes optional fields as ["X", "null"]: the converter dropped their enum."""
    from hearth.core.types import ResponseFormat
    from hearth.engines.llamacpp.native_spec import grammar_for

    strict = {"type": "function", "function": {"name": "weather", "parameters": NULLABLE_UNIT, "strict": True}}
    g = tool_calls.grammar(GenerateRequest(model="m", messages=[], tools=[strict], tool_choice="required"))
    assert '"\\"celsius\\""' in g and '"\\"fahrenheit\\""' in g
    fmt = ResponseFormat(type="json_schema", schema=NULLABLE_UNIT, strict=True)
    g = grammar_for(GenerateRequest(model="m", messages=[], response_format=fmt))
    assert g is not None and '"\\"celsius\\""' in g and "string ::=" not in g.split("unit-kv")[0].split("unit ::=")[-1]


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "object", "properties": {"a": {"type": "string"}}, "allOf": [{"required": ["a"]}]}, "'allOf'"),
    ({"type": "array", "prefixItems": [{"type": "string"}], "minItems": 2}, "prefixItems"),
])
def test_keywords_the_converter_takes_one_at_a_time_are_refused_together(schema: dict, words: str) -> None:
    from hearth.core.structured import check_enforceable

    with pytest.raises(BadRequest, match=words):
        check_enforceable(schema)


@pytest.mark.parametrize("forced", [True, False])
def test_parallel_calls_cut_off_in_a_further_one_keep_the_whole_ones(forced: bool) -> None:
    pieces = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n',
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n',
              '<tool_call>\n{"name": "']
    out = _drain(ToolCallGeneration(Scripted(pieces, "length"), NAMES, forced=forced))
    calls = [json.loads(c.arguments)["city"] for ch in out for c in ch.tool_calls]
    assert calls == ["Paris", "Rome"] and out[-1].finish_reason == "length"  # the answer was cut: it says so
    assert "<tool_call>" not in "".join(c.text for c in out)



def test_the_grammar_leaves_out_what_it_cannot_enforce() -> None:
    from hearth.core.structured import for_grammar

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3},
                                               "to": {"type": "string", "format": "email"}}}
    assert for_grammar(schema) == {"type": "object", "properties": {"n": {"type": "integer"},
                                                                    "to": {"type": "string"}}}


def test_a_strict_functions_arguments_are_checked_against_its_schema() -> None:
    strict = {"get_weather": NULLABLE_UNIT}
    bad = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}\n</tool_call>']
    with pytest.raises(StructuredOutputError, match="strict function 'get_weather'.*unit") as err:
        _drain(ToolCallGeneration(Scripted(bad), NAMES, forced=True, strict=strict))
    assert err.value.code == "tool_call_invalid"
    good = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": null}}\n</tool_call>']
    out = _drain(ToolCallGeneration(Scripted(good), NAMES, forced=True, strict=strict))
    assert out[-1].finish_reason == "tool_calls"
    loose = _drain(ToolCallGeneration(Scripted(bad), NAMES, forced=True))  # not strict: the call as made
    assert [c.name for ch in loose for c in ch.tool_calls] == ["get_weather"]


def test_type_lists_beside_refs_and_unions_and_fixed_tuples_still_work() -> None:
    """Regressions the rewrite must not cause: its null branch beside an anyOf, $ref paths into it,
    recursion, and pydantic's tuple[int, int] (prefixItems with minItems = maxItems = 2)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from hearth.core.structured import check_enforceable, for_grammar

    def root(schema: dict) -> str:
        return next(line for line in json_schema_to_gbnf(json.dumps(for_grammar(schema))).splitlines()
                    if line.startswith("root ::="))

    assert root({"type": ["object", "null"], "anyOf": [{"type": "object", "properties": {"x": {"type": "integer"}},
                                                        "required": ["x"]}]}) == "root ::= alternative-0"
    assert "c-kv" in root({"type": "object", "properties": {
        "a": {"type": ["object", "null"], "properties": {"b": {"type": "integer"}}},
        "c": {"$ref": "#/properties/a/properties/b"}}})
    assert root({"$defs": {"N": {"type": ["object", "null"], "properties": {"next": {"$ref": "#/$defs/N"}}}},
                 "$ref": "#/$defs/N"}) == "root ::= N"
    check_enforceable({"type": "array", "prefixItems": [{"type": "integer"}] * 2, "minItems": 2, "maxItems": 2})
