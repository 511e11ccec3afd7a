"""End to end: the real `ollama` Python client against `hearth serve` on the real bundled model."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone

import ollama
import pytest

from hearth.models.gguf_meta import read_gguf
from tests.conftest import Server

pytestmark = pytest.mark.model

MODEL = "gemma3-270m:latest"
ASK = [{"role": "system", "content": "You answer in one short sentence."},
       {"role": "user", "content": "What colour is the sky on a clear day?"}]


@pytest.fixture(scope="module")
def client(real_server: Server) -> ollama.Client:
    return ollama.Client(host=real_server.url, timeout=120)


def check_timings(resp: ollama.ChatResponse | ollama.GenerateResponse, max_eval: int) -> None:
    assert resp.done is True and resp.done_reason in ("stop", "length")
    assert resp.prompt_eval_count and resp.prompt_eval_count > 5
    assert resp.eval_count and 1 <= resp.eval_count <= max_eval
    assert resp.prompt_eval_duration and resp.prompt_eval_duration > 0
    assert resp.eval_duration and resp.eval_duration > 0
    assert resp.total_duration and resp.total_duration >= resp.prompt_eval_duration + resp.eval_duration
    # nanoseconds: a few tokens on this CPU take milliseconds, not nanoseconds or hours
    assert 1e5 < resp.total_duration < 120e9
    assert resp.load_duration is not None and resp.load_duration >= 0


def test_chat_non_stream(client: ollama.Client) -> None:
    resp = client.chat(model=MODEL, messages=ASK, options={"num_predict": 24, "seed": 1, "temperature": 0.2})
    assert resp.message.role == "assistant" and resp.message.content
    check_timings(resp, 24)


def test_chat_stream(client: ollama.Client) -> None:
    parts = list(client.chat(model=MODEL, messages=ASK, stream=True, options={"num_predict": 16, "seed": 2}))
    *pieces, last = parts
    assert pieces and all(p.done is False for p in pieces)
    assert "".join(p.message.content or "" for p in pieces).strip()
    check_timings(last, 16)
    assert last.eval_count is not None and last.eval_count >= len([p for p in pieces if p.message.content])


def test_num_predict_limits_and_reports_length(client: ollama.Client) -> None:
    resp = client.generate(model=MODEL, prompt="Write a long story about a lighthouse keeper.",
                           options={"num_predict": 5, "seed": 3})
    assert resp.done_reason == "length" and resp.eval_count == 5


def test_generate_non_stream_and_stream(client: ollama.Client) -> None:
    resp = client.generate(model=MODEL, prompt="Name one fruit.", system="Answer with a single word.",
                           options={"num_predict": 8, "seed": 4})
    assert resp.response.strip()
    check_timings(resp, 8)
    parts = list(client.generate(model=MODEL, prompt="Count from one to five:", stream=True,
                                 options={"num_predict": 12, "seed": 5}))
    assert parts[-1].done is True and all(not p.done for p in parts[:-1])
    assert "".join(p.response for p in parts).strip()
    check_timings(parts[-1], 12)


def test_generate_raw(client: ollama.Client) -> None:
    prompt = "<start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n"
    resp = client.generate(model=MODEL, prompt=prompt, raw=True, options={"num_predict": 8, "seed": 6})
    assert resp.done and resp.response.strip()


def test_same_seed_same_answer(client: ollama.Client) -> None:
    opts = {"num_predict": 12, "seed": 77, "temperature": 0.0}
    a = client.chat(model=MODEL, messages=ASK, options=opts).message.content
    b = client.chat(model=MODEL, messages=ASK, options=opts).message.content
    assert a == b


def test_structured_format_schema(client: ollama.Client) -> None:
    schema = {"type": "object",
              "properties": {"city": {"type": "string", "maxLength": 20},
                             "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    resp = client.chat(model=MODEL, format=schema, options={"num_predict": 80, "seed": 8, "temperature": 0.0},
                       messages=[{"role": "user", "content": "Give the largest city of France and its population "
                                                             "as JSON."}])
    value = json.loads(resp.message.content or "")
    assert set(value) == {"city", "population"}
    assert isinstance(value["city"], str) and len(value["city"]) <= 20 and isinstance(value["population"], int)
    answer = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    parts = list(client.generate(model=MODEL, prompt="Is the sky blue? Answer in JSON.", format=answer,
                                 stream=True, options={"num_predict": 40, "seed": 9, "temperature": 0.0}))
    assert parts[-1].done is True and parts[-1].done_reason == "stop"
    assert json.loads("".join(p.response for p in parts))["answer"] in ("yes", "no")


def test_unenforceable_schema_is_a_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model=MODEL, messages=ASK, format={"type": "object", "patternProperties": {"^a": {}}})
    assert exc.value.status_code == 400 and "patternProperties" in exc.value.error


def test_unknown_model_is_a_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat(model="llama3.2", messages=ASK)
    assert exc.value.status_code == 404 and MODEL in exc.value.error


def test_embed(client: ollama.Client) -> None:
    resp = client.embed(model=MODEL, input=["The cat sat on the mat.", "Quarterly revenue rose."])
    assert len(resp.embeddings) == 2
    dim = len(resp.embeddings[0])
    assert dim == client.show(MODEL).modelinfo["gemma3.embedding_length"]
    assert all(math.isclose(math.hypot(*v), 1.0, rel_tol=1e-4) for v in resp.embeddings)
    assert resp.prompt_eval_count and resp.prompt_eval_count > 4 and resp.total_duration
    legacy = client.embeddings(model=MODEL, prompt="The cat sat on the mat.")
    assert len(legacy.embedding) == dim
    assert sum(a * b for a, b in zip(legacy.embedding, resp.embeddings[0])) > 0.999


def test_embed_over_the_context_without_truncate_names_the_input(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        client.embed(model=MODEL, input=["short", "word " * 5000], truncate=False)
    assert exc.value.status_code == 400
    assert "input[1]" in exc.value.error and "truncate: true" in exc.value.error, exc.value.error
    assert len(client.embed(model=MODEL, input="word " * 5000).embeddings) == 1  # truncated by default


def test_list(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    entry = models[MODEL]
    assert entry.details and entry.details.format == "gguf" and entry.details.family == "gemma3"
    assert entry.details.quantization_level == "Q4_K_M" and entry.details.parameter_size
    assert entry.size and entry.size > 100_000_000 and entry.modified_at


def test_show(client: ollama.Client) -> None:
    info = client.show(MODEL)
    assert info.details and info.details.family == "gemma3"
    assert info.modelinfo and info.modelinfo["general.architecture"] == "gemma3"
    assert info.modelinfo["gemma3.context_length"] > 0
    assert info.capabilities and {"completion", "embedding"} <= set(info.capabilities)
    # the GGUF's own chat template ("" when the file carries none and hearth uses its built-in fallback)
    path = (info.modelfile or "").split("FROM ", 1)[1].splitlines()[0]
    assert info.template == (read_gguf(path).chat_template or "")
    assert info.parameters and "num_ctx" in info.parameters


def ps_entry(client: ollama.Client) -> ollama.ProcessResponse.Model | None:
    return next((m for m in client.ps().models if m.model == MODEL), None)


def wait_unloaded(client: ollama.Client, seconds: float = 10) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if ps_entry(client) is None:
            return True
        time.sleep(0.3)
    return False


def test_ps_and_keep_alive(client: ollama.Client) -> None:
    client.generate(model=MODEL, prompt="Hi", keep_alive="2m", options={"num_predict": 2})
    entry = ps_entry(client)
    assert entry and entry.context_length and entry.context_length > 0 and entry.size and entry.expires_at
    left = (entry.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 100 < left <= 120
    client.chat(model=MODEL, messages=[], keep_alive=-1)
    forever = ps_entry(client)
    assert forever and forever.expires_at and forever.expires_at.year > 2200


def test_keep_alive_unload_and_load(client: ollama.Client) -> None:
    unloaded = client.generate(model=MODEL, prompt="", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    assert ps_entry(client) is None
    loaded = client.chat(model=MODEL, messages=[])
    assert loaded.done and loaded.done_reason == "load" and loaded.load_duration and loaded.load_duration > 1e6
    assert ps_entry(client) is not None
    # keep_alive 0 on a real request: the answer comes back, then the model leaves memory
    resp = client.chat(model=MODEL, messages=ASK, keep_alive=0, options={"num_predict": 4})
    assert resp.message.content is not None and resp.done
    assert wait_unloaded(client)
    # the next request loads it again and says how long that took
    again = client.chat(model=MODEL, messages=ASK, options={"num_predict": 2})
    assert again.load_duration and again.load_duration > 1e6
    assert ps_entry(client) is not None
