"""Upstreams under faults: failover, ejection and recovery, broken streams, stalls, 500s, strict schemas.

One `hearth serve --fake` is started with several upstreams, each pointing at
small fake servers on 127.0.0.1 (tests/fake_upstream.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.conftest import Server, config_server, free_port
from tests.fake_upstream import FakeUpstream

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


class Fakes:
    """The fake upstream servers of this module, by role."""

    def __init__(self) -> None:
        self.good = FakeUpstream().start()
        self.good2 = FakeUpstream().start()
        self.flaky_port = free_port()  # nothing listens here until the recovery test
        self.late_port = free_port()  # an upstream that comes up after hearth (the listing test)
        self.cloud_flaky_port = free_port()  # a cloud replica that is down, then recovers
        self.err500 = FakeUpstream(mode="error500").start()
        self.good3 = FakeUpstream().start()
        self.only500 = FakeUpstream(mode="error500").start()
        self.die = FakeUpstream(mode="die").start()
        self.stall = FakeUpstream(mode="stall").start()
        self.stall_mid = FakeUpstream(mode="stall_mid").start()
        self.endless = FakeUpstream(mode="endless_line").start()
        self.bad = FakeUpstream(mode="badjson").start()
        self.slow1 = FakeUpstream(delay=0.4).start()
        self.slow2 = FakeUpstream(delay=0.4).start()
        self.olla = FakeUpstream(kind="ollama", models=("llamita:8b", "nomic-embed:latest")).start()
        self.noembed1 = FakeUpstream(mode="noembed").start()
        self.noembed2 = FakeUpstream(mode="noembed").start()
        self.olla_noembed = FakeUpstream(kind="ollama", mode="noembed", models=("chatty:1b",)).start()
        self.all = [self.good, self.good2, self.err500, self.good3, self.only500, self.die, self.stall,
                    self.stall_mid, self.endless, self.bad, self.slow1, self.slow2, self.olla, self.noembed1,
                    self.noembed2, self.olla_noembed]

    def config(self) -> str:
        dead = f"http://127.0.0.1:{free_port()}"
        return f"""
[upstreams.cl]  # loopback, but declared cloud: treated as one (the path a real cloud API takes)
kind = "openai"
urls = ["{self.good.url}"]
models = ["m"]
cloud = true

[upstreams.clpair]  # a cloud with two replicas: no health checks go there
kind = "openai"
urls = ["http://127.0.0.1:{self.cloud_flaky_port}", "{self.good3.url}"]
models = ["m"]
cloud = true
health_interval = 0.5

[upstreams.clstall]  # a cloud that sends one piece, then nothing
kind = "openai"
urls = ["{self.stall_mid.url}"]
models = ["m"]
cloud = true
timeouts = {{ first_token = 1.0, idle = 1.0 }}

[upstreams.endless]
kind = "openai"
urls = ["{self.endless.url}"]
models = ["m"]

[upstreams.late]
kind = "openai"
urls = ["http://127.0.0.1:{self.late_port}/v1"]  # as the OpenAI SDK spells a base URL
refresh = 1

[upstreams.good]
kind = "openai"
urls = ["{self.good.url}"]
drop_params = ["top_k", "logit_bias"]

[upstreams.mixed]
kind = "openai"
urls = ["http://127.0.0.1:{self.flaky_port}", "{self.good2.url}"]
models = ["m"]
health_interval = 0.3

[upstreams.five]
kind = "openai"
urls = ["{self.err500.url}", "{self.good3.url}"]
models = ["m"]

[upstreams.only500]
kind = "openai"
urls = ["{self.only500.url}"]
models = ["m"]

[upstreams.twin]
kind = "openai"
urls = ["{self.good.url}", "{self.good2.url}"]
models = ["m"]

[upstreams.down]
kind = "openai"
urls = ["{dead}"]

[upstreams.down2]
kind = "openai"
urls = ["{dead}"]
models = ["m"]

[upstreams.dies]
kind = "openai"
urls = ["{self.die.url}"]
models = ["m"]

[upstreams.stall]
kind = "openai"
urls = ["{self.stall.url}"]
models = ["m"]
timeouts = {{ first_token = 1.0, idle = 1.0 }}

[upstreams.stallmid]
kind = "openai"
urls = ["{self.stall_mid.url}"]
models = ["m"]
timeouts = {{ first_token = 1.0, idle = 1.0 }}

[upstreams.bad]
kind = "openai"
urls = ["{self.bad.url}"]
models = ["m"]

[upstreams.badstrict]
kind = "openai"
urls = ["{self.bad.url}"]
models = ["m"]
strict = true

[upstreams.pair]
kind = "openai"
urls = ["{self.slow1.url}", "{self.slow2.url}"]
models = ["m"]

[upstreams.olla]
kind = "ollama"
urls = ["{self.olla.url}/api/"]  # as some Ollama clients spell it

[upstreams.chatonly]
kind = "openai"
urls = ["{self.noembed1.url}", "{self.noembed2.url}"]
models = ["m"]

[upstreams.ollachat]
kind = "ollama"
urls = ["{self.olla_noembed.url}"]

[aliases]
main = "gemma3-270m:latest"
fast = "m@good"
vec = {{ target = "e-embed@good", dimension = 1024 }}
"""


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    f = Fakes()
    yield f
    for s in f.all:
        s.stop()


@pytest.fixture(scope="module")
def server(fakes: Fakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from config_server(tmp_path_factory, "upstream-home", fakes.config())


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=30)


def chat(server: Server, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=30)


def test_chat_streams_and_translates_usage(server: Server, fakes: Fakes) -> None:
    c = client(server)
    out = c.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == f"Hello from upstream {fakes.good.port}"
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (7, 4)
    stream = c.chat.completions.create(model="m@good", messages=[{"role": "user", "content": "hi"}],
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == f"Hello from upstream {fakes.good.port}"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_streams_from_an_upstream_reuse_its_connections(server: Server, fakes: Fakes) -> None:
    # llama-server, vLLM and Ollama stream in chunked bodies: the last chunk comes after the end event
    ask = [{"role": "user", "content": "hi"}]
    for up, model in ((fakes.good, "m@good"), (fakes.olla, "llamita:8b@olla")):
        c = client(server)
        list(c.chat.completions.create(model=model, messages=ask, stream=True))  # type: ignore[arg-type]
        time.sleep(0.1)
        before = len(up.transports)
        for stream in (True, False, True):  # hearth streams from upstreams either way
            out = c.chat.completions.create(model=model, messages=ask, stream=stream)  # type: ignore
            if stream:
                list(out)  # type: ignore[arg-type]
            time.sleep(0.1)  # the connection is back once the body's end has been read
        assert len(up.transports) == before, f"{model}: each request opened a new connection"


def test_completions_and_embeddings(server: Server, fakes: Fakes) -> None:
    c = client(server)
    out = c.completions.create(model="m@good", prompt="say", max_tokens=5)
    assert out.choices[0].text.startswith("Hello from")
    emb = c.embeddings.create(model="e-embed@good", input=["a", "b"])
    vec = emb.data[1].embedding
    assert len(vec) == 8 and abs(sum(x * x for x in vec) - 1.0) < 1e-6


def test_a_model_that_embeds_is_listed_as_one(server: Server) -> None:
    # discovery guesses from the name and family (bge-m3 or all-minilm would be taken for chat models)
    def listed() -> dict[str, Any]:
        models = {m["id"]: m for m in httpx.get(server.v1 + "/models", timeout=30).json()["data"]}
        assert models["llamita:8b"]["owned_by"] == "olla"
        return models["llamita:8b"]
    assert "embedding" not in listed()["capabilities"]
    client(server).embeddings.create(model="llamita:8b@olla", input="a")
    after = listed()  # and a re-listing keeps what the answer taught
    assert "embedding" in after["capabilities"] and after["embedding_dimension"] == 8, after


def test_embedding_dimensions_an_upstream_ignores_are_a_400_not_vectors_of_another_size(
        server: Server, fakes: Fakes) -> None:
    # llama-server ignores `dimensions`: handing its 8 numbers to a client that asked for 4 would
    # fail later, at the client's insert into a 4-wide column
    with pytest.raises(openai.BadRequestError) as err:
        client(server).embeddings.create(model="e-embed@good", input="a", dimensions=4)
    msg = str(err.value)
    assert "'good' does not shorten" in msg and "8-dimensional" in msg and "drop `dimensions`" in msg, msg
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "dimensions"
    # Ollama shortens: the asked size comes back, and is not taken for the model's native size
    r = httpx.post(server.url + "/api/embed", json={"model": "nomic-embed:latest@olla", "input": "a",
                                                    "dimensions": 4}, timeout=30)
    assert r.status_code == 200 and len(r.json()["embeddings"][0]) == 4, r.text
    listed = {m["id"]: m for m in httpx.get(server.v1 + "/models", timeout=30).json()["data"]}
    assert listed["nomic-embed:latest"].get("embedding_dimension") in (None, 8), listed["nomic-embed:latest"]


def test_unsupported_params_are_dropped_with_a_log_line(server: Server, fakes: Fakes) -> None:
    r = chat(server, "m@good", top_k=5, temperature=0.5, logit_bias={"5": 1.0})
    assert r.status_code == 200, r.text
    sent = fakes.good.bodies[-1]
    assert "top_k" not in sent and "logit_bias" not in sent and sent["temperature"] == 0.5
    assert "does not support 'top_k'" in server.log()


def test_a_participant_name_reaches_an_openai_upstream(server: Server, fakes: Fakes) -> None:
    said = [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "hey bob"},
            {"role": "user", "content": "hello", "name": "ann"}]
    r = chat(server, "m@good", messages=said)
    assert r.status_code == 200, r.text
    assert [m.get("name") for m in fakes.good.bodies[-1]["messages"]] == ["bob", None, "ann"]


def test_models_are_listed_with_upstream_names(server: Server) -> None:
    listed = {m.id: m for m in client(server).models.list().data}
    assert {"m", "e-embed", "llamita:8b", "fake:latest"} <= set(listed)
    assert getattr(listed["e-embed"], "context_length") == 4096  # what a request may use, not n_ctx_train
    # an Ollama upstream's context is num_ctx per request: unknown, so not claimed (as 0 it read "no context")
    assert not hasattr(listed["llamita:8b"], "context_length"), listed["llamita:8b"]


def test_refused_replica_fails_over_and_is_ejected(server: Server, fakes: Fakes) -> None:
    before = fakes.good2.requests
    for _ in range(4):
        r = chat(server, "m@mixed")
        assert r.status_code == 200, r.text
    assert fakes.good2.requests - before == 4
    assert "ejected" in server.log()


def replica_up(server: Server, upstream: str) -> dict[str, float]:
    """hearth_upstream_replica_up of each replica of `upstream`, from /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    pattern = r'hearth_upstream_replica_up\{engine="%s",replica="([^"]+)"\} (\S+)' % upstream
    return {url: float(v) for url, v in re.findall(pattern, text)}


def test_recovered_replica_is_readmitted(server: Server, fakes: Fakes) -> None:
    assert chat(server, "m@mixed").status_code == 200  # the dead replica is ejected by now
    flaky = f"http://127.0.0.1:{fakes.flaky_port}"
    assert replica_up(server, "mixed") == {flaky: 0.0, fakes.good2.url: 1.0}  # what an operator's alert sees
    revived = FakeUpstream(port=fakes.flaky_port).start()
    try:
        time.sleep(1.0)  # health checks every 0.3 s
        for _ in range(6):
            assert chat(server, "m@mixed").status_code == 200
        assert revived.requests >= 2, "a recovered replica must get traffic again"
        assert "re-admitted" in server.log()
        assert replica_up(server, "mixed") == {flaky: 1.0, fakes.good2.url: 1.0}
    finally:
        revived.stop()


def test_an_ejected_cloud_replica_is_tried_again_after_its_probation(server: Server, fakes: Fakes) -> None:
    for _ in range(2):  # rotation reaches the dead replica: refused, retried on the other, ejected
        assert chat(server, "m@clpair").status_code == 200
    flaky = f"http://127.0.0.1:{fakes.cloud_flaky_port}"
    assert replica_up(server, "clpair") == {flaky: 0.0, fakes.good3.url: 1.0}
    revived = FakeUpstream(port=fakes.cloud_flaky_port).start()
    try:
        time.sleep(0.7)  # health_interval is the probation of a cloud upstream
        for _ in range(4):
            assert chat(server, "m@clpair").status_code == 200
        assert revived.requests >= 1, "a recovered cloud replica must get traffic again"
        assert replica_up(server, "clpair") == {flaky: 1.0, fakes.good3.url: 1.0}
    finally:
        revived.stop()


def test_discovered_models_are_listed_when_the_upstream_comes_up_and_follow_its_list(
        server: Server, fakes: Fakes) -> None:
    # nobody asks for these models by name: /v1/models and /api/tags alone must show them
    def ids() -> set[str]:
        return {m["id"] for m in httpx.get(server.v1 + "/models", timeout=30).json()["data"]}

    def tags() -> set[str]:
        return {m["name"] for m in httpx.get(server.url + "/api/tags", timeout=30).json()["models"]}

    assert "late-model" not in ids()  # down when hearth started
    late = FakeUpstream(port=fakes.late_port, models=("late-model",)).start()
    try:
        deadline = time.time() + 10  # re-listed every 5 s while it did not answer
        while time.time() < deadline and "late-model" not in ids():
            time.sleep(0.3)
        assert "late-model" in ids() and "late-model" in tags()
        late.models = ("late-model", "later-model")  # its list changes: `refresh = 1`
        deadline = time.time() + 5
        while time.time() < deadline and "later-model" not in ids():
            time.sleep(0.3)
        assert {"late-model", "later-model"} <= ids() and "later-model" in tags()
        assert chat(server, "later-model@late").status_code == 200
    finally:
        late.stop()


def test_every_request_sent_to_a_cloud_upstream_is_recorded_without_content(server: Server) -> None:
    assert chat(server, "m@cl").status_code == 200
    refused = chat(server, "m@cl", messages=[{"role": "user", "content": "secret " * 400}])  # too long for it
    assert refused.status_code == 400, refused.text
    lines = [line for line in server.log().splitlines() if "cloud request upstream=cl" in line]
    assert any("outcome=ok" in line and "prompt_tokens=" in line for line in lines), lines
    assert any("outcome=error 400" in line for line in lines), lines
    assert "secret" not in server.log()  # neither the prompt nor any of it
    calls = httpx.get(server.url + "/admin/privacy", timeout=30).json()["cloud_calls"]
    assert [c["requests"] for c in calls if c["engine"] == "cl"] == [2], calls


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_a_cloud_stream_the_client_leaves_is_recorded_too(server: Server, fakes: Fakes, path: str) -> None:
    def audited() -> list[str]:
        return [line for line in server.log().splitlines() if "cloud request upstream=clstall" in line]

    seen = len(audited())
    body = {"model": "m@clstall", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", server.url + path, json=body, timeout=10) as r:
        assert r.status_code == 200
        assert any("Hello" in line for line in r.iter_lines())  # the prompt reached the cloud; then leave
    deadline = time.monotonic() + 5
    while len(audited()) == seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [line for line in audited()[seen:] if "outcome=cancelled" in line], audited()


def test_replica_answering_500_fails_over(server: Server, fakes: Fakes) -> None:
    for _ in range(3):
        r = chat(server, "m@five")
        assert r.status_code == 200, r.text
        assert str(fakes.good3.port) in r.json()["choices"][0]["message"]["content"]


def test_upstream_answering_only_500_is_502_naming_it(server: Server) -> None:
    r = chat(server, "m@only500")
    assert r.status_code == 502
    msg = r.json()["error"]["message"]
    assert "only500" in msg and "HTTP 500" in msg and "failed the request" in msg


def test_a_request_every_replica_answers_500_ejects_none(server: Server, fakes: Fakes) -> None:
    # llama-server answers 500 to a history its chat template rejects: the request is at fault, and one
    # bad client must not take the pool out of rotation
    r = httpx.post(server.v1 + "/chat/completions", timeout=30, json={"model": "m@twin", "messages": [
        {"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]})
    assert r.status_code == 502, r.text
    msg = r.json()["error"]["message"]
    assert msg.count("Conversation roles must alternate") == 2 and "the request is the cause" in msg, msg
    status = {u["name"]: u for u in httpx.get(server.url + "/admin/upstreams", timeout=30).json()["upstreams"]}
    assert [rep["healthy"] for rep in status["twin"]["replicas"]] == [True, True], status["twin"]
    assert chat(server, "m@twin").status_code == 200


def test_upstream_that_cannot_do_a_request_is_400_and_stays_in_rotation(server: Server, fakes: Fakes) -> None:
    # llama-server started without --embeddings answers 501: a fact about the server, not a fault of a
    # replica, so no failover to the other replica, no ejection, and the client learns what to change
    sent = len(fakes.noembed1.bodies) + len(fakes.noembed2.bodies)
    for url in (server.v1 + "/embeddings", server.url + "/api/embed"):  # both dialects
        r = httpx.post(url, json={"model": "m@chatonly", "input": "hi"}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        msg = err["message"] if isinstance(err, dict) else err  # OpenAI's envelope or Ollama's
        assert "'chatonly'" in msg and "HTTP 501" in msg and "--embeddings" in msg, msg
    assert len(fakes.noembed1.bodies) + len(fakes.noembed2.bodies) - sent == 2  # one replica each time
    # llama-server without a projector says so for an image with a 500: the same kind of fact
    image = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    r = httpx.post(server.v1 + "/chat/completions", timeout=30, json={
        "model": "m@chatonly", "messages": [{"role": "user", "content": image}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_supported", r.text
    assert "HTTP 500" in r.text and "image input is not supported" in r.text
    assert len(fakes.noembed1.bodies) + len(fakes.noembed2.bodies) - sent == 3
    r = chat(server, "m@chatonly")  # chat on the same upstream is unaffected
    assert r.status_code == 200, r.text
    # Ollama says the same for a chat-only model
    r = httpx.post(server.v1 + "/embeddings", json={"model": "chatty:1b@ollachat", "input": "hi"}, timeout=30)
    assert r.status_code == 400, r.text
    assert "'ollachat'" in r.json()["error"]["message"] and "does not support embeddings" in r.text
    ejected = "".join(line for line in server.log().splitlines() if "ejected" in line)
    assert "chatonly" not in ejected and "ollachat" not in ejected, ejected


def test_prompt_too_long_for_an_upstream_is_context_length_exceeded(server: Server) -> None:
    long = "word " * 1000
    for model in ("m@good", "llamita:8b@olla"):
        r = httpx.post(server.v1 + "/chat/completions", json={"model": model, "messages": [
            {"role": "user", "content": long}]}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded", err  # what OpenAI clients look for to trim a history
        assert "context" in err["message"] and "shorten the prompt" in err["message"], err
    r = httpx.post(server.url + "/api/chat", json={"model": "m@good", "messages": [
        {"role": "user", "content": long}]}, timeout=30)
    assert r.status_code == 400 and "exceeds the available context size" in r.json()["error"], r.text
    r = chat(server, "m@good")  # a short one still goes through
    assert r.status_code == 200, r.text


def test_each_request_has_an_id_in_its_answer_its_log_line_and_upstream(server: Server, fakes: Fakes) -> None:
    raw = client(server).chat.completions.with_raw_response.create(
        model="m@good", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    own = raw.headers["x-request-id"]
    assert own.startswith("req_") and fakes.good.request_ids[-1] == own
    again = chat(server, "m@good").headers["x-request-id"]
    assert again != own and again.startswith("req_")
    # a client's own id (a trace id) is kept end to end; an unusable one is replaced
    r = httpx.post(server.v1 + "/chat/completions", headers={"X-Request-Id": "trace-7f3a"}, timeout=30,
                   json={"model": "m@good", "messages": [{"role": "user", "content": "hi"}]})
    assert r.headers["x-request-id"] == "trace-7f3a" and fakes.good.request_ids[-1] == "trace-7f3a"
    r = httpx.post(server.v1 + "/chat/completions", headers={"X-Request-Id": "x" * 200}, timeout=30,
                   json={"model": "m@good", "messages": [{"role": "user", "content": "hi"}]})
    assert r.headers["x-request-id"].startswith("req_")
    # an error carries it too, and the log line of a 5xx names it: a user's report finds the line
    with pytest.raises(openai.APIStatusError) as err:
        client(server).chat.completions.create(model="m@down", messages=[{"role": "user", "content": "hi"}])
    rid = err.value.request_id
    assert rid and rid.startswith("req_")
    assert any(f"[{rid}]" in line and "'down'" in line for line in server.log().splitlines()), rid
    assert httpx.post(server.url + "/api/chat", json={"model": "nope"}, timeout=30).headers["x-request-id"]


def test_down_upstream_is_503_naming_it(server: Server) -> None:
    for model in ("m@down", "m@down2"):
        r = chat(server, model)
        assert r.status_code == 503, (model, r.text)
        assert ("'down'" if model == "m@down" else "'down2'") in r.json()["error"]["message"]


def test_an_unknown_model_while_an_upstream_is_down(server: Server) -> None:
    # it may be one of the down upstream's models: 503 (retry later), with what is served meanwhile
    r = chat(server, "llama3.1:70b")
    assert r.status_code == 503 and "models are unknown" in r.text and "served now:" in r.text, r.text
    # a near miss of a served name is a typo: 404 naming the model meant, not "retry in 5 s"
    r = chat(server, "llamita:9b")
    assert r.status_code == 404 and "did you mean 'llamita:8b'?" in r.json()["error"]["message"], r.text


def failures_counted(server: Server) -> float:
    """hearth_requests_total of chat requests that ended in a 502, from /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(n) for n in re.findall(r'hearth_requests_total\{[^}]*status="502"[^}]*\} (\S+)', text))


def test_hearth_upstreams_shows_each_replica_its_state_and_last_error(server: Server, fakes: Fakes) -> None:
    assert chat(server, "m@down2").status_code == 503  # its one replica is ejected now
    assert chat(server, "m@good").status_code == 200
    cli = [sys.executable, "-m", "hearth", "upstreams", "--url", server.url]
    data = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30, check=True).stdout)
    ups = {u["name"]: u for u in data["upstreams"]}
    assert ups["olla"]["kind"] == "ollama" and "llamita:8b" in ups["olla"]["models"]
    assert ups["cl"]["cloud"] is True and ups["good"]["replicas"][0]["served"] >= 1
    (down,) = ups["down2"]["replicas"]
    assert down["healthy"] is False and "refused" in down["last_error"].lower(), down
    wide = {**os.environ, "COLUMNS": "300"}  # a table is cut at the terminal's width
    table = subprocess.run(cli, capture_output=True, text=True, timeout=30, check=True, env=wide).stdout.splitlines()
    assert table[0].split()[:4] == ["UPSTREAM", "KIND", "REPLICA", "STATE"]
    row = next(line for line in table if line.startswith("down2 "))
    assert "ejected" in row and "refused" in row.lower(), row
    assert "healthy" in next(line for line in table if line.startswith("good "))


def test_stream_that_dies_ends_in_a_clean_error_and_is_not_retried(server: Server, fakes: Fakes) -> None:
    before, failed = fakes.die.requests, failures_counted(server)
    stream = client(server).chat.completions.create(
        model="m@dies", messages=[{"role": "user", "content": "hi"}], stream=True)
    texts = []
    with pytest.raises(openai.APIError) as info:
        for ch in stream:
            texts.append(ch.choices[0].delta.content or "")
    assert "dies" in str(info.value) and "incomplete" in str(info.value)
    assert "".join(texts) == "Hello from"
    assert fakes.die.requests - before == 1
    rid = stream.response.headers["x-request-id"]  # the log and the metrics count it a failure, not a 200
    assert any(f"stream ended with 502 [{rid}]" in line for line in server.log().splitlines()), rid
    assert failures_counted(server) == failed + 1
    r = chat(server, "m@dies")
    assert r.status_code == 502 and "dies" in r.json()["error"]["message"]


def test_a_line_that_never_ends_is_cut_at_8_mb(server: Server) -> None:
    # a broken upstream must not make hearth hold (and re-join) an ever longer line
    t0 = time.monotonic()
    r = chat(server, "m@endless")
    assert r.status_code == 502 and "longer than 8 MB" in r.json()["error"]["message"], r.text
    assert time.monotonic() - t0 < 10
    assert chat(server, "m@good").status_code == 200


def test_stall_before_first_token_times_out(server: Server) -> None:
    t0 = time.monotonic()
    r = chat(server, "m@stall")
    assert r.status_code == 503
    assert "first_token" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5


def test_stall_mid_stream_hits_idle_timeout(server: Server) -> None:
    r = chat(server, "m@stallmid")
    assert r.status_code == 504
    assert "timeouts.idle" in r.json()["error"]["message"]


def _settled_cuts(fake: FakeUpstream) -> int:
    """The fake's hang-up count once an earlier test's request has been seen to end (a loaded
    machine may notice it late, which would count it for the next test)."""
    deadline = time.monotonic() + 5
    while fake.stalled and time.monotonic() < deadline:
        time.sleep(0.01)
    return fake.cut


def _wait_cut(fake: FakeUpstream, before: int, limit: float) -> float:
    """Seconds until the fake saw hearth hang up (fails after `limit`)."""
    t0 = time.monotonic()
    while fake.cut == before and time.monotonic() - t0 < limit:
        time.sleep(0.01)
    assert fake.cut == before + 1, "hearth did not hang up on the upstream"
    return time.monotonic() - t0


def test_client_leaving_a_stream_hangs_up_on_the_upstream(server: Server, fakes: Fakes) -> None:
    before = _settled_cuts(fakes.stall_mid)
    body = {"model": "m@stallmid", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        assert any("Hello" in line for line in r.iter_lines())  # the first piece arrived; then leave
    # noticed at once, not at the upstream's 1 s idle timeout
    assert _wait_cut(fakes.stall_mid, before, 3) < 0.6


def test_client_leaving_a_non_streamed_request_hangs_up_on_the_upstream(server: Server, fakes: Fakes) -> None:
    before = _settled_cuts(fakes.stall_mid)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/chat/completions", json={"model": "m@stallmid", "messages": [
            {"role": "user", "content": "hi"}]}, timeout=0.3)
    assert _wait_cut(fakes.stall_mid, before, 3) < 0.5


def _schema_format(strict: bool) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": strict}}


def test_structured_output_is_validated_strict_is_502(server: Server) -> None:
    ok = chat(server, "m@good", response_format=_schema_format(True))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == '{"name": "ok"}'
    r = chat(server, "m@bad", response_format=_schema_format(True))
    assert r.status_code == 502
    assert "5 is not of type 'string'" in r.json()["error"]["message"]
    lenient = chat(server, "m@bad", response_format=_schema_format(False))
    assert lenient.status_code == 200 and lenient.json()["choices"][0]["message"]["content"] == '{"name": 5}'
    forced = chat(server, "m@badstrict", response_format=_schema_format(False))
    assert forced.status_code == 502


def test_least_outstanding_balancing_spreads_load(server: Server, fakes: Fakes) -> None:
    b1, b2 = fakes.slow1.requests, fakes.slow2.requests
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: chat(server, "m@pair").status_code, range(8)))
    assert codes == [200] * 8
    assert (fakes.slow1.requests - b1, fakes.slow2.requests - b2) == (4, 4)


def test_ollama_upstream_through_openai_dialect(server: Server, fakes: Fakes) -> None:
    c = client(server)
    out = c.chat.completions.create(model="llamita:8b", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=9, seed=3, logit_bias={"5": 1.0})
    assert out.choices[0].message.content.startswith("Hello from upstream")
    assert out.usage.prompt_tokens == 7
    sent = fakes.olla.bodies[-1]
    assert sent["options"]["num_predict"] == 9 and sent["options"]["seed"] == 3 and "logit_bias" not in sent
    emb = c.embeddings.create(model="nomic-embed", input="a")
    assert len(emb.data[0].embedding) == 8


def test_an_ollama_upstream_models_are_described_as_it_lists_them(server: Server) -> None:
    cl = ollama.Client(host=server.url, timeout=30)
    shown = cl.show("llamita:8b@olla").details
    assert shown is not None and (shown.family, shown.parameter_size, shown.quantization_level, shown.format) \
        == ("llama", "8.0B", "Q4_0", "gguf")
    listed = {m.model: m for m in cl.list().models}["llamita:8b"]
    assert listed.size == 4661224676 and listed.digest and listed.digest.startswith("365c0bd3")
    assert listed.modified_at is not None and listed.modified_at.year == 2024


def test_api_show_of_an_ollama_upstream_model_says_what_the_upstream_shows(server: Server) -> None:
    # clients such as Open WebUI offer image upload by the `vision` capability
    shown = ollama.Client(host=server.url, timeout=30).show("llamita:8b@olla")
    assert shown.capabilities == ["completion", "vision", "tools"]
    assert shown.template == "{{ .Prompt }}" and shown.license == "LLAMA 3.2 COMMUNITY LICENSE"
    assert shown.parameters and "<|eot_id|>" in shown.parameters
    assert shown.modelinfo and shown.modelinfo["mllama.context_length"] == 131072
    assert "shown" not in shown.modelinfo
    # its context is Ollama's per-request num_ctx, unknown here: not claimed to be 0
    assert shown.modelfile is not None and "num_ctx" not in shown.modelfile


def test_api_ps_shows_what_an_ollama_upstream_holds(server: Server) -> None:
    ps = {m["name"]: m for m in httpx.get(server.url + "/api/ps", timeout=30).json()["models"]}
    assert ps["llamita:8b"]["context_length"] == 8192 and ps["llamita:8b"]["size"] == 6654289920
    assert ps["llamita:8b"]["expires_at"].startswith("2030-01-02T02:04:05")  # in UTC
    assert "nomic-embed:latest" not in ps  # listed by the upstream, but not in its memory
    out = subprocess.run([sys.executable, "-m", "hearth", "ps", "--url", server.url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "llamita:8b" in out.stdout and "8192" in out.stdout, out.stdout + out.stderr


def test_pull_copy_delete_of_an_upstream_model_say_whose_it_is(server: Server) -> None:
    cl = ollama.Client(host=server.url, timeout=30)
    for call, verb in ((lambda: cl.delete("llamita:8b"), "deletes"), (lambda: cl.copy("m", "m2"), "copies"),
                       (lambda: cl.pull("llamita:8b", stream=False), "pulls")):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 400 and "served by upstream" in str(err.value) and verb in str(err.value)
    assert "llamita:8b" in {m.model for m in cl.list().models}  # nothing happened to it


def test_load_and_unload_through_hearth_reach_an_ollama_upstream(server: Server, fakes: Fakes) -> None:
    # `ollama run` and Open WebUI load a model, and unload it with keep_alive 0, by a prompt-less request
    cl = ollama.Client(host=server.url, timeout=30)
    assert cl.generate(model="llamita:8b", keep_alive="10m").done_reason == "load"
    assert fakes.olla.loads[-1] == {"model": "llamita:8b", "keep_alive": "600s"}
    assert cl.generate(model="llamita:8b", keep_alive=0).done_reason == "unload"
    assert fakes.olla.loads[-1] == {"model": "llamita:8b", "keep_alive": "0s"}


def test_embedding_alias_dimension_is_checked_on_first_use(server: Server) -> None:
    r = httpx.post(server.v1 + "/embeddings", json={"model": "vec", "input": "a"}, timeout=30)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "1024" in msg and "gives 8" in msg and "dimension = 8" in msg
