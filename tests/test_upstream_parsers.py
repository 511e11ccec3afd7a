"""The parsers of upstream streams (SSE from `/v1/*` servers, NDJSON from Ollama), line by line and in bulk."""

from __future__ import annotations

import random

import pytest

from hearth.core.errors import UpstreamError
from hearth.engines.upstream.ollama import NDJSONParser
from hearth.engines.upstream.openai import DATA_LINE, SSEParser


def sse(*events: str) -> list[bytes]:
    return [line.encode() for e in events for line in (f"data: {e}", "")]


def test_sse_data_lines_in_their_spellings() -> None:
    """`data:` with or without a space, trailing blanks and CR, empty data lines, comments and other fields."""
    p = SSEParser(chat=True)
    lines = [b'data:{"choices":[{"delta":{"content":"a"}}]}', b"", b': data: {"not": "an event"}',
             b'data:   {"choices":[{"delta":{"content":"b"}}]}  \r', b"\r", b"data:", b"data:  \r",
             b'id: 7', b'event: data', b'retry: 10', b'  data: {"indented": "not a field"}',
             b'data: {"choices":[{"delta":{"content":"c"}}]}\r', b"data:[DONE]\r", b'data: {"choices":[]}']
    assert p.feed(lines) == "abc"
    assert p.done and p.pieces == 3


def test_sse_data_line_values_match_the_rule_spelled_out() -> None:
    """The one-regex scan finds what a line-by-line reading of the rule finds: each line that starts
    with `data:`, its value stripped of blanks (not newlines) on both sides."""
    pieces = [b"data:", b"data: ", b" ", b"\t", b"\r", b"\n", b"\x0b", b"\x0c", b"x", b"{}", b"[DONE]", b":", b"a b",
              b"\xc3\xa9"]
    rng = random.Random(5)
    for _ in range(20000):
        text = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        rule = [line[5:].strip(b" \t\r\x0b\x0c") for line in text.split(b"\n") if line.startswith(b"data:")]
        assert DATA_LINE.findall(text) == rule, text


def test_sse_read_with_text_finish_usage_and_done() -> None:
    p = SSEParser(chat=True)
    lines = [b": keep-alive comment", b"event: message"] + sse(
        '{"choices":[{"delta":{"role":"assistant","content":""}}]}',
        '{"choices":[{"delta":{"content":"Hel"}}]}',
        '{"choices":[{"delta":{"content":"lo"},"finish_reason":"length"}]}',
        '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":3}}}',
        "[DONE]",
        '{"choices":[{"delta":{"content":"after the end"}}]}',
    )
    assert p.feed(lines) == "Hello"
    assert p.done and p.finish == "length" and p.pieces == 2
    u = p.final_usage()
    assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (5, 2, 3)


def test_sse_content_filter_and_refusal_are_kept() -> None:
    # a filtered answer must not look like a normal end, a refusal not like the answer
    p = SSEParser(chat=True)
    assert p.feed(sse('{"choices":[{"delta":{"role":"assistant","content":null,"refusal":"No,"}}]}',
                      '{"choices":[{"delta":{"refusal":" sorry."},"finish_reason":"content_filter"}]}')) == ""
    assert p.finish == "content_filter" and "".join(p.refusal) == "No, sorry."


def test_sse_split_across_reads_and_completions_text() -> None:
    p = SSEParser(chat=False)
    assert p.feed(sse('{"choices":[{"text":"a"}]}')) == "a"
    assert p.feed([b""]) == ""
    assert p.feed(sse('{"choices":[{"text":"b","finish_reason":"stop"}]}', "[DONE]")) == "b"
    assert p.done and p.final_usage().completion_tokens == 2  # no usage sent: pieces counted


@pytest.mark.parametrize(("line", "words"), [
    (b"data: {not json", ["not JSON", "{not json"]),
    (b"data: 5", ["not a JSON object", "5"]),
    (b'data: ["a"]', ["not a JSON object"]),
    (b'data: {"error":{"message":"out of memory"}}', ["error mid-stream", "out of memory"]),
])
def test_sse_bad_lines_are_named(line: bytes, words: list[str]) -> None:
    p = SSEParser(chat=True)
    with pytest.raises(UpstreamError) as info:
        p.feed(sse('{"choices":[{"delta":{"content":"fine"}}]}') + [line])
    for w in words:
        assert w in info.value.message


def test_ndjson_stops_at_done_and_reads_timings() -> None:
    p = NDJSONParser(chat=True)
    lines = [
        b'{"message":{"content":"Hi"},"done":false}',
        b"",
        (b'{"message":{"content":" there"},"done":true,"done_reason":"length","prompt_eval_count":4,'
         b'"eval_count":2,"eval_duration":1000}'),
        b'{"message":{"content":"ignored"},"done":false}',
    ]
    assert p.feed(lines) == "Hi there"
    assert p.done and p.finish == "length"
    u = p.final_usage()
    assert (u.prompt_tokens, u.completion_tokens, u.generate_ns) == (4, 2, 1000)


def test_ndjson_error_line() -> None:
    p = NDJSONParser(chat=False)
    with pytest.raises(UpstreamError, match="model crashed"):
        p.feed([b'{"response":"x"}', b'{"error":"model crashed"}'])


def test_sse_tool_call_pieces_become_whole_calls_in_index_order() -> None:
    p = SSEParser(chat=True)
    deltas = [
        '{"index":1,"id":"call_t","type":"function","function":{"name":"get_time","arguments":""}}',
        '{"index":0,"id":"call_w","type":"function","function":{"name":"get_weather","arguments":"{\\"ci"}}',
        '{"index":0,"function":{"arguments":"ty\\": \\"Oslo\\"}"}}',
        '{"index":1,"function":{"arguments":"{}"}}',
    ]
    events = [f'{{"choices":[{{"delta":{{"tool_calls":[{d}]}}}}]}}' for d in deltas]
    assert p.feed(sse(*events, '{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}', "[DONE]")) == ""
    assert p.calls_seen and p.finish == "tool_calls"
    calls = p.tool_calls()
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call_w", "get_weather", '{"city": "Oslo"}'), ("call_t", "get_time", "{}")]


def test_sse_tool_call_without_id_or_arguments_gets_defaults() -> None:
    p = SSEParser(chat=True)
    p.feed(sse('{"choices":[{"delta":{"tool_calls":[{"function":{"name":"ping"}}]}}]}'))
    (call,) = p.tool_calls()
    assert call.name == "ping" and call.arguments == "{}" and call.id.startswith("call_")
    for bad in ('["x"]', '[{"index":"0","function":{"name":"f"}}]'):
        with pytest.raises(UpstreamError, match="tool call delta"):
            SSEParser(chat=True).feed(sse(f'{{"choices":[{{"delta":{{"tool_calls":{bad}}}}}]}}'))


def test_ndjson_tool_calls_have_text_arguments_and_ids() -> None:
    p = NDJSONParser(chat=True)
    p.feed([b'{"message":{"content":"","tool_calls":[{"function":{"name":"get_weather",'
            b'"arguments":{"city":"Oslo"}}},{"id":"c2","function":{"name":"noop"}}]},"done":false}',
            b'{"message":{"content":""},"done":true,"done_reason":"stop"}'])
    calls = p.tool_calls()
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Oslo"}'), ("noop", "{}")]
    assert calls[0].id.startswith("call_") and calls[1].id == "c2" and p.finish == "stop"
    with pytest.raises(UpstreamError, match="without a function"):
        NDJSONParser(chat=True).feed([b'{"message":{"tool_calls":[{"name":"x"}]},"done":false}'])


def test_sse_tool_call_deltas_without_index_continue_the_last_call() -> None:
    p = SSEParser(chat=True)
    deltas = ['{"id":"a","function":{"name":"f","arguments":"{\\"x\\""}}', '{"function":{"arguments":": 1}"}}',
              '{"id":"b","function":{"name":"g","arguments":"{}"}}']
    p.feed(sse(*(f'{{"choices":[{{"delta":{{"tool_calls":[{d}]}}}}]}}' for d in deltas)))
    assert [(c.id, c.name, c.arguments) for c in p.tool_calls()] == [("a", "f", '{"x": 1}'), ("b", "g", "{}")]


def test_logprobs_in_each_shape_and_trimmed_to_what_was_asked() -> None:
    chat = SSEParser(chat=True)
    chat.feed(sse('{"choices":[{"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi","logprob":-0.1,'
                  '"top_logprobs":[{"token":"Hi","logprob":-0.1},{"token":"Yo","logprob":-2.5}]}]}}]}'))
    (one,) = chat.take_logprobs(1)
    assert (one.token, one.logprob, one.bytes, [a.token for a in one.top]) == ("Hi", -0.1, list(b"Hi"), ["Hi"])
    assert chat.take_logprobs(1) == ()  # handed out once
    legacy = SSEParser(chat=False)
    legacy.feed(sse('{"choices":[{"text":"a b","logprobs":{"tokens":["a"," b"],"token_logprobs":[-1.0,-2.0],'
                    '"top_logprobs":[{"a":-1.0},{" b":-2.0}],"text_offset":[0,1]}}]}'))
    assert [(e.token, e.logprob, [a.token for a in e.top]) for e in legacy.take_logprobs(None)] == \
        [("a", -1.0, ["a"]), (" b", -2.0, [" b"])]
    olla = NDJSONParser(chat=True)
    olla.feed([b'{"message":{"content":"x"},"logprobs":[{"token":"x","logprob":-0.3,"bytes":[120]}],"done":false}'])
    assert [e.token for e in olla.take_logprobs(0)] == ["x"] and olla.logprobs_seen


@pytest.mark.parametrize("line", [
    b'{"message":{"content":"x"},"logprobs":{"token":"x"},"done":false}',
    b'{"message":{"content":"x"},"logprobs":[{"token":"x"}],"done":false}',
    b'{"message":{"content":"x"},"logprobs":[{"token":5,"logprob":-1}],"done":false}',
])
def test_malformed_logprobs_are_named(line: bytes) -> None:
    with pytest.raises(UpstreamError, match="logprobs"):
        NDJSONParser(chat=True).feed([line])
