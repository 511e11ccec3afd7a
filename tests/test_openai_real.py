"""End to end: the real `openai` SDK against `hearth serve` on the real bundled model."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest

from tests.conftest import Server
from tests.openai_schema import validate

pytestmark = pytest.mark.model

MODEL = "gemma3-270m:latest"


@pytest.fixture(scope="module")
def client(real_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server.v1, api_key="unused", max_retries=0)


def test_chat_non_stream(client: openai.OpenAI, real_server: Server) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "You are terse."},
                               {"role": "user", "content": "Name a color."}],
        max_tokens=12, seed=3, temperature=0.7,
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage and resp.usage.prompt_tokens > 5
    assert resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    raw = httpx.post(real_server.v1 + "/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=60).json()
    validate(raw, "CreateChatCompletionResponse")
    assert raw["choices"][0]["message"]["refusal"] is None
    assert raw["choices"][0]["logprobs"] is None


def test_chat_stream_shape(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count: one, two,"}],
        max_tokens=10, stream=True, stream_options={"include_usage": True}, seed=1,
    )
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens >= 1 and text


def test_stream_matches_non_stream_with_seed(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about cats."}],
              max_tokens=24, seed=42, temperature=0.9)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    s = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                if c.choices)
    assert a == b == s
    other = client.chat.completions.create(**{**kw, "seed": 43}).choices[0].message.content
    assert other != a


def test_raw_sse_wire_format(real_server: Server) -> None:
    with httpx.stream("POST", real_server.v1 + "/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
    }) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    import json

    for ln in lines[:-1]:
        validate(json.loads(ln.removeprefix("data: ")), "CreateChatCompletionStreamResponse")


def test_stop_sequences_never_emitted(client: openai.OpenAI) -> None:
    base = dict(model=MODEL, messages=[{"role": "user", "content": "List numbers: 1, 2, 3, 4, 5, 6, 7"}],
                max_tokens=40, temperature=0)
    free = client.chat.completions.create(**base).choices[0].message.content or ""
    assert len(free) > 6
    # Stop on a piece of what the model says unconstrained (works across token boundaries).
    stop = free[3:6]
    stopped = client.chat.completions.create(**base, stop=[stop, "zzzz"])
    text = stopped.choices[0].message.content or ""
    assert stop not in text
    assert free.startswith(text)
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**base, stop=stop, stream=True) if c.choices)
    assert streamed == text


def test_penalties_and_top_p_accepted(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_completion_tokens=8,
        presence_penalty=1.0, frequency_penalty=0.5, top_p=0.9, user="tester", seed=5,
    )
    assert resp.usage and resp.usage.completion_tokens <= 8


def test_n_choices(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say a word"}], max_tokens=6, n=2, seed=9,
    )
    assert [c.index for c in resp.choices] == [0, 1]


def test_default_model_when_omitted(real_server: Server) -> None:
    r = httpx.post(real_server.v1 + "/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
    assert r.json()["model"] == MODEL


def test_alias_and_short_name(client: openai.OpenAI) -> None:
    for name in ("main", "gemma3-270m"):
        resp = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}],
                                              max_tokens=2)
        assert resp.choices[0].message.content is not None


def test_completions(client: openai.OpenAI, real_server: Server) -> None:
    resp = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=5,
                                     temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.text for c in resp.choices)
    stream = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, stream=True,
                                            temperature=0))
    text = "".join(c.choices[0].text for c in stream if c.choices)
    single = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5, temperature=0)
    assert text == single.choices[0].text
    raw = httpx.post(real_server.v1 + "/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2},
                     timeout=60).json()
    validate(raw, "CreateCompletionResponse")


def test_completions_echo(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=4, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=4,
                                       temperature=0, echo=True, n=2)
    assert [c.text for c in echoed.choices] == [
        p + c.text for p, c in zip(["The sky is"] * 2 + ["Water is"] * 2, [plain.choices[0]] * 2 + [plain.choices[1]] * 2)]
    stream = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == "The sky is" + plain.choices[0].text
    with pytest.raises(openai.BadRequestError, match="echo with logprobs"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, echo=True, logprobs=1)


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    f = client.embeddings.create(model=MODEL, input=["hello world", "goodbye"])
    assert len(f.data) == 2 and f.usage.prompt_tokens > 0
    v = f.data[0].embedding
    assert len(v) == 640
    assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4)
    b = client.embeddings.create(model=MODEL, input="hello world", encoding_format="base64")
    raw = b.data[0].embedding
    if isinstance(raw, str):
        raw = list(struct.unpack(f"<{len(base64.b64decode(raw)) // 4}f", base64.b64decode(raw)))
    assert len(raw) == 640
    assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(raw, v))
    assert f.data[0].embedding != f.data[1].embedding


def test_embedding_dimensions_contract(client: openai.OpenAI) -> None:
    ok = client.embeddings.create(model=MODEL, input="x", dimensions=640)
    assert len(ok.data[0].embedding) == 640
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=MODEL, input="x", dimensions=256)
    assert "640" in str(exc.value)


def test_models(client: openai.OpenAI, real_server: Server) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    one = httpx.get(real_server.v1 + f"/models/{MODEL}").json()
    assert one["context_length"] > 0 and one["embedding_dimension"] == 640
    validate(one, "Model")
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert MODEL in str(exc.value)


def test_context_length_exceeded(client: openai.OpenAI) -> None:
    long = "word " * 5000
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=5)
    body = exc.value.body
    assert isinstance(body, dict) and body["code"] == "context_length_exceeded"
    assert "4096" in body["message"]
    with pytest.raises(openai.BadRequestError) as exc2:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
    assert exc2.value.body["code"] == "context_length_exceeded"


def test_logit_bias_outside_the_vocabulary_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       logit_bias={"99999999": 5})
    body = exc.value.body
    assert isinstance(body, dict) and body["param"] == "logit_bias"
    assert "99999999" in body["message"] and "vocabulary" in body["message"]


def test_unknown_model_404_lists_models(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="llama9", messages=[{"role": "user", "content": "x"}])
    assert MODEL in str(exc.value)


def test_health_and_ready(real_server: Server) -> None:
    assert httpx.get(real_server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(real_server.url + "/ready").status_code == 200
